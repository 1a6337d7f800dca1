from services.worker.app import app, settings
from shared.logs import configure_logging


def main() -> None:
    configure_logging("worker", settings.log_level)
    app.worker_main(
        ["worker", f"--loglevel={settings.log_level}", f"--concurrency={settings.concurrency}"]
    )


if __name__ == "__main__":
    main()
