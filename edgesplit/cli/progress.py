"""Progress bars on stderr (stdout stays clean for ``--json``).

Bars start on the first step, so a bad option fails with its one-line error before any bar is
drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class TrainProgress:
    """``on_epoch`` / ``on_step`` callbacks for :func:`edgesplit.train.engine.run_training`."""

    def __init__(self, label: str, epochs: int, *, per_epoch: bool, quiet: bool) -> None:
        self.label, self.epochs, self.per_epoch, self.quiet = label, epochs, per_epoch, quiet
        self._bar: Any = None
        self._task: Any = None
        self._epoch = -1

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                             console=Console(stderr=True))
        self._bar.start()
        if not self.per_epoch:
            self._task = self._bar.add_task(f"{self.label} epochs", total=self.epochs, info="")

    def step(self, epoch: int, step: int, steps: int) -> None:
        if self.quiet:
            return
        if self._bar is None:
            self._start()
        if self.per_epoch and epoch != self._epoch:
            self._epoch = epoch
            self._task = self._bar.add_task(f"{self.label} epoch {epoch + 1}/{self.epochs}",
                                            total=steps, info="")
        if self.per_epoch:
            self._bar.update(self._task, completed=step + 1)

    def __call__(self, epoch: int, epochs: int, row: dict[str, float]) -> None:
        if self.quiet:
            return
        if self._bar is None:
            self._start()
        info = f"loss {row['loss']:.3f}  train acc {row['train_accuracy']:.3f}"
        if self.per_epoch and self._task is not None:
            self._bar.update(self._task, info=info)
        elif not self.per_epoch:
            self._bar.update(self._task, completed=epoch + 1, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@contextmanager
def epoch_progress(label: str, epochs: int, *, quiet: bool = False,
                   per_epoch: bool = False) -> Iterator[TrainProgress]:
    """A :class:`TrainProgress`: one bar for the run, or one bar per epoch (``per_epoch``)."""
    progress = TrainProgress(label, epochs, per_epoch=per_epoch, quiet=quiet)
    try:
        yield progress
    finally:
        progress.close()


@contextmanager
def sweep_progress(show: bool = True) -> Iterator[Callable[[str, int, int], None] | None]:
    """``on_progress(label, finished, total)`` for :func:`edgesplit.evaluate.sweep.run_sweep`.

    One bar on stderr: the running cell's label, cells finished out of the total. ``None`` when
    not ``show`` (``--no-progress``).
    """
    if not show:
        yield None
        return
    bar = _Bar("[bold]evaluate[/] {task.description}", spinner=True)
    try:
        yield bar.update
    finally:
        bar.close()


@contextmanager
def edge_progress(show: bool = True) -> Iterator[Callable[[str, int, int, str], None] | None]:
    """``on_progress(label, done, total, info)`` for :meth:`edgesplit.edge.runtime.EdgeClient.run`.

    One bar on stderr: samples sent out of the total, with the running accuracy / bytes. ``None``
    when not ``show`` (``--json``). Needs only rich, so it works on the torch-free install.
    """
    if not show:
        yield None
        return
    bar = _Bar("{task.description}", info=True)
    try:
        yield bar.update
    finally:
        bar.close()


class _Bar:
    """One rich bar on stderr, started on its first update."""

    def __init__(self, description: str, *, spinner: bool = False,
                 info: bool = False) -> None:
        self.description, self.spinner, self.info = description, spinner, info
        self._bar: Any = None
        self._task: Any = None

    def _start(self, label: str, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns: list[Any] = [SpinnerColumn()] if self.spinner else []
        columns += [TextColumn(self.description), BarColumn(), MofNCompleteColumn()]
        if self.info:
            columns.append(TextColumn("{task.fields[info]}"))
        columns.append(TimeElapsedColumn())
        self._bar = Progress(*columns, console=Console(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, info="")

    def update(self, label: str, completed: int, total: int, info: str = "") -> None:
        if self._bar is None:
            self._start(label, total)
        self._bar.update(self._task, description=label, completed=completed, total=total,
                         info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
