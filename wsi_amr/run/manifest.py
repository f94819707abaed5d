from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from wsi_amr import __version__
from wsi_amr.locks import _now
from wsi_amr.outputs import write_json_atomic
from wsi_amr.run.task import MANIFEST, JobContext, SlideResult, SlideTask


# ---------------------------------------------------------------------------------------------
# Manifest, freshness, locks
# ---------------------------------------------------------------------------------------------
def slide_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime": round(st.st_mtime, 3)}


def read_manifest(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def step_is_current(
    out_dir: Path, slide: Path, command: str, params: dict[str, Any], slide_mpp: float | None
) -> bool:
    """True when ``command`` already finished on this slide, with these parameters, and its
    outputs are all there."""
    manifest = read_manifest(out_dir)
    step = manifest.get("steps", {}).get(command)
    if not step or step.get("status") not in ("done", "empty"):
        return False
    try:
        ident = slide_identity(slide)
    except OSError:
        return False
    old = manifest.get("slide", {})
    if old.get("bytes") != ident["bytes"] or old.get("mtime") != ident["mtime"]:
        return False
    if step.get("slide_mpp") != slide_mpp or step.get("params") != _jsonable(params):
        return False
    return all((out_dir / name).exists() for name in step.get("outputs", {}).values())


def is_current(task: SlideTask, out_dir: Path) -> bool:
    """True when this task's outputs are complete and current (the task can be skipped)."""
    return step_is_current(out_dir, Path(task.slide), task.command, task.params.as_dict(), task.slide_mpp)


def is_current_step(ctx: JobContext[Any], command: str, params: dict[str, Any]) -> bool:
    """For a job: has ``command`` already run on this slide with exactly ``params``?"""
    return step_is_current(ctx.out_dir, ctx.slide_path, command, params, ctx.slide_mpp)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def update_manifest(out_dir: Path, task: SlideTask, result: SlideResult, extra: dict[str, Any]) -> None:
    manifest = read_manifest(out_dir)
    with contextlib.suppress(OSError):
        manifest["slide"] = {**manifest.get("slide", {}), **slide_identity(Path(task.slide)), **extra}
    manifest["tool"] = {"name": "wsi-amr", "version": __version__}
    manifest.setdefault("steps", {})[task.command] = {
        "status": result.status,
        "command": task.command_line,
        "params": _jsonable(task.params.as_dict()),
        "slide_mpp": task.slide_mpp,
        "finished": _now(),
        "seconds": round(result.seconds, 3),
        "outputs": result.outputs,
        "stats": result.stats,
        "error": result.message if result.status == "failed" else None,
        "warnings": extra.get("_warnings", []),
    }
    manifest["slide"].pop("_warnings", None)
    write_json_atomic(out_dir / MANIFEST, manifest)
