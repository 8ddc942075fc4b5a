"""Progress bars on stderr (stdout stays clean for ``--json``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def epoch_progress(
    label: str, epochs: int, *, quiet: bool = False
) -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    """Yield an ``on_epoch`` callback that advances a bar showing loss and train accuracy."""
    if quiet:
        yield lambda *_: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(f"{label} epochs", total=epochs, info="")

        def on_epoch(epoch: int, total: int, row: dict[str, float]) -> None:
            bar.update(
                task,
                completed=epoch + 1,
                info=f"loss {row['loss']:.3f} train acc {row['train_accuracy']:.3f}",
            )

        yield on_epoch
