"""Progress bars (rich, on stderr) fed by Dask worker events: draws per chain, then covariance blocks (and, on a
token run, the token reduction's blocks)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

TOPIC = "bif-progress"
#: A reduction's bar, by the ``stage`` of its events (tasks/steps.py, bif.tasks.pipeline.reduce_covariance).
STAGE_LABELS = {"covariance": "covariance blocks", "tokens": "token blocks"}


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
        self.stage_tasks: dict[str, Any] = {}

    def _handle(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        stage = msg.get("stage")
        if stage is not None:  # a reduction's blocks: one bar each (a token run has two reductions)
            if stage not in self.stage_tasks:
                self.stage_tasks[stage] = self.progress.add_task(STAGE_LABELS.get(stage, f"{stage} blocks"),
                                                                 total=msg["total"])
            self.progress.update(self.stage_tasks[stage], completed=msg["done"], total=msg["total"])
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
