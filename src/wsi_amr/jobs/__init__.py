"""Per-slide jobs: what one command does to one slide, run by :mod:`wsi_amr.batch`.

Each module has ``run(ctx: JobContext) -> dict`` returning ``{"outputs": {role: file name},
"stats": {...}, "slide": {...}}``; it opens the slide itself (inside the worker).
"""
