"""`python -m demo_shop.orders`: the orders service alone, configured by environment variables."""

from demo_shop.orders import api, handlers
from demo_shop.web import serve_service


def main() -> None:
    """Run the orders service and its HTTP API until SIGINT or SIGTERM."""
    serve_service(handlers.service, api.create_app(), default_port=8001)


if __name__ == "__main__":
    main()
