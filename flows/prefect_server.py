"""Run against a Prefect API: the one in PREFECT_API_URL, or a local server started for the run.

Prefect's temporary-server mode breaks with Dask worker processes (each worker starts
its own server against one SQLite file), so with no PREFECT_API_URL we start one real
local server on 127.0.0.1, export its URL (worker processes inherit it), and stop it
after draining Prefect's log and event workers.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

#: Settings applied to every run: no telemetry, no DNS lookups to the outside.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


def quiet_prefect_env() -> None:
    """Turn Prefect telemetry off for this process and its children."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def prefect_api(*, startup_timeout: int = 90) -> Iterator[Callable[[], str]]:
    """Provide a Prefect API: the one in PREFECT_API_URL, or a local server started here.

    Yields ``ready()``, which blocks until the API answers and returns its URL. A local
    server boots in a background thread from entry on, with its URL already exported, so
    the caller can start the Dask cluster (whose workers inherit PREFECT_API_URL) while the
    server boots; the two start-up costs overlap instead of adding up.
    """
    quiet_prefect_env()
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield lambda: url
        return
    import threading

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer(port=SubprocessASGIServer().find_available_port())
    url = server.api_url
    errors: list[BaseException] = []

    def boot() -> None:
        try:
            server.start(timeout=startup_timeout)
        except BaseException as err:  # noqa: BLE001 - re-raised by ready()
            errors.append(err)

    thread = threading.Thread(target=boot, name="prefect-server-boot", daemon=True)
    thread.start()

    def ready() -> str:
        thread.join()
        if errors:
            raise RuntimeError(f"the local Prefect server did not start: {errors[0]}") from errors[0]
        if server.api_url != url:  # Prefect retried on another port after a clash
            raise RuntimeError(f"the local Prefect server moved from {url} to {server.api_url}; rerun")
        return url

    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield ready
            finally:
                drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        thread.join()
        server.stop()


def drain_prefect_workers() -> None:
    """Flush Prefect's background log and event workers (else exit hangs ~80 s)."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)
