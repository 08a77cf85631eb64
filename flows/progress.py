"""Progress bars (rich, on stderr) fed by Dask worker events: draws per chain, then covariance blocks."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

TOPIC = "bif-progress"


class RunProgress:
    """Context manager that subscribes to the ``bif-progress`` topic of a distributed Client."""

    def __init__(self, client: Any, *, num_chains: int, num_draws: int, enabled: bool = True):
        self.client = client
        self.enabled = enabled
        self.num_chains = num_chains
        self.num_draws = num_draws
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
                                 console=Console(stderr=True))  # stdout carries only the summary
        self.chain_tasks: dict[int, Any] = {}
        self.cov_task = None

    def _handle(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        if msg.get("stage") == "covariance":
            if self.cov_task is None:
                self.cov_task = self.progress.add_task("covariance blocks", total=msg["total"])
            self.progress.update(self.cov_task, completed=msg["done"])
            return
        c = msg["chain"]
        if c not in self.chain_tasks:
            self.chain_tasks[c] = self.progress.add_task(f"chain {c} draws", total=msg["total"])
        self.progress.update(self.chain_tasks[c], completed=msg["done"])

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self.progress.start()
            self.client.subscribe_topic(TOPIC, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            try:
                self.client.unsubscribe_topic(TOPIC)
            finally:
                self.progress.stop()


class StdoutConsole(Console):
    """A rich Console for a command's output on stdout. When the reader closes the pipe early (`bif show ... |
    head`), rich's default exits 1. This one raises BrokenPipeError instead, which ``bif.flows.cli.main`` ends
    quietly with 0, as other Unix tools do."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError
