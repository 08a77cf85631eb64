"""Run against a Prefect API: the one in PREFECT_API_URL, or a local server started for the run.

Prefect's temporary-server mode breaks with Dask worker processes (each worker starts
its own server against one SQLite file), so with no PREFECT_API_URL we start one real
local server on 127.0.0.1, export its URL (worker processes inherit it), and stop it
after draining Prefect's log and event workers.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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
def prefect_api(*, startup_timeout: int = 90) -> Iterator[str]:
    """Yield a Prefect API URL: the configured one, or a local server started and stopped here."""
    quiet_prefect_env()
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=startup_timeout)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def drain_prefect_workers() -> None:
    """Flush Prefect's background log and event workers (else exit hangs ~80 s)."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)
