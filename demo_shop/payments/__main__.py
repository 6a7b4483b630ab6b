"""`python -m demo_shop.payments`: the payments service alone, configured by environment variables."""

from demo_shop.payments import api, handlers
from demo_shop.web import serve_service


def main() -> None:
    """Run the payments service and its HTTP API until SIGINT or SIGTERM."""
    serve_service(handlers.service, api.create_app(), default_port=8003)


if __name__ == "__main__":
    main()
