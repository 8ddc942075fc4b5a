"""Progress bars on stderr (stdout stays clean for ``--json``).

Bars start on the first step, so a bad option fails with its one-line error before any bar is
drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
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
