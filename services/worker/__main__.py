from services.worker.app import app, settings
from shared.logs import configure_logging


def main() -> None:
    configure_logging("worker", settings.log_level)
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--concurrency={settings.concurrency}",
            # Workers share nothing but the queue: skip the start-up handshakes.
            "--without-mingle",
            "--without-gossip",
        ]
    )


if __name__ == "__main__":
    main()
