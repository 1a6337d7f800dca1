import uvicorn

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from shared.logs import configure_logging


def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our JSON logging
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
