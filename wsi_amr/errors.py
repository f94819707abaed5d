"""What a training run reports when it cannot start or continue: one line naming the file or
option, and the exit status the CLI gives it."""

from __future__ import annotations

from pathlib import Path


class TrainingError(Exception):
    """Training cannot start or continue; one line naming the file or option and the fix."""

    exit_code = 2


class TrainingInputError(TrainingError):
    """Bad options or missing inputs (a usage error: exit status 2)."""

    exit_code = 2


class TrainingDataError(TrainingError):
    """Inputs that exist but whose contents cannot be used (found while loading: exit status 1)."""

    exit_code = 1


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving ``OUT/last``; ``step`` steps are done."""

    def __init__(self, step: int, out: Path) -> None:
        super().__init__(f"interrupted at step {step}; saved {out / 'last.safetensors'}")
        self.step = step
        self.out = out
