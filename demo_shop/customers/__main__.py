"""`python -m demo_shop.customers`: the customers service alone, configured by environment variables."""

from demo_shop.customers import api, handlers
from demo_shop.web import serve_service


def main() -> None:
    """Run the customers service and its HTTP API until SIGINT or SIGTERM."""
    serve_service(handlers.service, api.create_app(), default_port=8002)


if __name__ == "__main__":
    main()
