"""What one command does to one slide, run by :mod:`wsi_amr.run.worker`.

Each module has ``run(ctx: JobContext) -> dict`` returning ``{"outputs": {role: file name},
"stats": {...}, "slide": {...}}``; it opens the slide itself (inside the worker). The runner loads
a job by its ``"module:function"`` name in :data:`wsi_amr.run.task.JOBS`, so that ``run`` never
imports ``jobs`` and a worker imports only the job it runs.
"""
