"""Progress bars on stderr (rich): one bar for the batch, one for the slide being worked on."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from wsi_amr.run.task import SlideResult, SlideTask


class BatchProgress:
    """Shows slides done out of the batch, and the current slide's own progress when serial.

    Bars only draw on a terminal; in pipelines and CI nothing is printed.
    """

    def __init__(self, command: str, total: int) -> None:
        console = Console(stderr=True)
        self._enabled = console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            disable=not self._enabled,
        )
        self._batch = self._progress.add_task(f"{command}: slides", total=total)
        self._slide: Any = None
        self._progress.start()

    def slide_progress(self, task: SlideTask) -> Callable[[int, int], None]:
        from pathlib import Path

        if self._slide is not None:
            self._progress.remove_task(self._slide)
        self._slide = self._progress.add_task(Path(task.slide).name, total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(self._slide, completed=done, total=total)

        return update

    def slide_done(self, result: SlideResult) -> None:
        self._progress.advance(self._batch)

    def close(self) -> None:
        self._progress.stop()
