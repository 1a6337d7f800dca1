"""`python -m services.worker`: the Celery worker, with Prometheus /metrics on
RETINAL_WORKER_METRICS_PORT (0: none).

prometheus_client chooses where metric values live when it is first imported: the folder of
its multiprocess mode (services/worker/observability.py) is set before the worker's modules,
which import it, are imported.
"""

import os
import tempfile

from services.worker.settings import WorkerSettings


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="retinal-worker-metrics-") as folder:
        if WorkerSettings().metrics_port:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        # Imported here, after the folder is set (see the module's doc).
        from services.worker.app import app, settings
        from services.worker.observability import serve_metrics
        from shared.logs import configure_logging

        configure_logging("worker", settings.log_level)
        if settings.metrics_port:
            serve_metrics(settings.metrics_host, settings.metrics_port)
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
