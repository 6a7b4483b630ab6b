"""The demo shop: three services playing the `order` choreography saga with choreo.

    demo_shop/events.py      the published language (shared by all services)
    demo_shop/orders/        places orders, approves, rejects and cancels them (HTTP)
    demo_shop/customers/     credit limits and per-order reservations (HTTP)
    demo_shop/payments/      authorizes and refunds payments (no public API)
    demo_shop/shop.py        the three services together: one process, one HTTP app
    demo_shop/web.py         lifespan, /health, and serving one service alone
    demo_shop/money.py       Decimal amounts in requests and database columns
    demo_shop/walkthrough.py every flow of the saga, driven through the HTTP API
    demo_shop/__main__.py    `demo-shop`: broker + services + API + walkthrough in one command

Each service owns its database and its consumer group; no service reads another's tables.
"""
