"""`python -m demo_shop.order_history`: the order history read model alone, configured by environment variables."""

from demo_shop.order_history import api, handlers
from demo_shop.web import serve_service


def main() -> None:
    """Run the order history service and its HTTP API until SIGINT or SIGTERM."""
    serve_service(handlers.service, api.create_app(), default_port=8004)


if __name__ == "__main__":
    main()
