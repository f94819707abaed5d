"""What one command does to one slide, run by :mod:`wsi_amr.run.worker`.

Each module has ``run(ctx: JobContext[P]) -> dict``, ``P`` the command's parameter dataclass,
returning ``{"outputs": {role: file name}, "stats": {...}, "slide": {...}}``; it opens the slide
itself (inside the worker). The runner loads a job by its ``"module:function"`` name in
:data:`wsi_amr.run.task.JOBS`, so that ``run`` never imports ``jobs`` and a worker imports only the
job it runs. Jobs speak to the command's user, so their messages may name its flags.
"""


def coarser_model(command: str, mpp: float, works: str = "works") -> str:
    """How a "finer than level 0" message ends for a command whose resolution is its model's
    (``segment``, ``classify``): the model's resolution, and the training option that sets it."""
    return (f"the model {works} at {mpp:g} µm/px; {command} this slide with a model trained at its "
            f"resolution or coarser (train {command} --mpp)")
