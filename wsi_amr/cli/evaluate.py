"""``wsi-amr evaluate``: Dice and IoU of predicted segmentations against references, or accuracy,
balanced accuracy and AUC of slide classifications against a labels CSV.

Segmentation: predictions and references are label images (PNG/TIFF) or QuPath GeoJSON, single
files or folders matched by file stem. Per pair: Dice and IoU per class and their means; over all
pairs: the same from the summed pixel counts (pooled) and the mean of the per-pair mean Dice.

Classification (the reference is a ``slide,label`` CSV): ``wsi-amr classify`` outputs matched to
the labels by slide stem; accuracy, balanced accuracy, AUC and the confusion matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from wsi_amr.cli.options import fail
from wsi_amr.evaluation import (
    GEOJSON_SUFFIXES,
    EvaluationError,
    classes_of,
    evaluate_pair,
    read_predictions,
)
from wsi_amr.metrics import ClassificationScores, Scores, classification_scores, scores_from_confusion
from wsi_amr.params import carry, flag_text

LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
SUFFIXES = LABEL_SUFFIXES + GEOJSON_SUFFIXES


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name.lower().endswith(SUFFIXES) and not p.name.startswith("."):
            out.setdefault(_stem(p), p)
    return out


def match_pairs(pred: Path, ref: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(name, prediction, reference) pairs, and the names found on one side only.

    Two files: one pair. Two folders: files matched by stem (``a.png`` with ``a.geojson``),
    searched recursively, so ``OUT/<stem>/<stem>.geojson`` matches ``refs/<stem>.geojson``.
    """
    for p in (pred, ref):
        if not p.exists():
            raise EvaluationError(f"{p}: no such file or folder")
    if pred.is_file() and ref.is_file():
        return [(_stem(pred), pred, ref)], []
    if pred.is_dir() != ref.is_dir():
        raise EvaluationError("give two files or two folders (PRED and REF)")
    preds, refs = _files(pred), _files(ref)
    names = sorted(set(preds) & set(refs))
    if not names:
        raise EvaluationError(f"no file in {pred} has a reference of the same name in {ref}")
    unmatched = sorted(set(preds) ^ set(refs))
    return [(n, preds[n], refs[n]) for n in names], unmatched


def _table(rows: list[tuple[str, Scores]], pooled: Scores | None) -> None:
    from rich.console import Console
    from rich.table import Table

    classes = rows[0][1].classes
    table = Table(title="Segmentation: Dice / IoU per class", show_lines=False)
    table.add_column("pair")
    for c in classes:
        table.add_column(f"{c} Dice", justify="right")
        table.add_column(f"{c} IoU", justify="right")
    table.add_column("mean Dice", justify="right")
    table.add_column("mean IoU", justify="right")

    def add(name: str, s: Scores, style: str | None = None) -> None:
        cells = [f"{v:.4f}" for pair in zip(s.dice, s.iou) for v in pair]
        table.add_row(name, *cells, f"{s.mean_dice:.4f}", f"{s.mean_iou:.4f}", style=style)

    for name, s in rows:
        add(name, s)
    if pooled is not None:
        add("all (pooled pixels)", pooled, "bold")
    Console().print(table)


def evaluate(
    pred: Annotated[Path, typer.Argument(help="Prediction: label image, QuPath GeoJSON, or a folder of them; "
                                         "for classification a classify output folder, classification.json or "
                                         "summary.csv.", show_default=False)],
    ref: Annotated[Path, typer.Argument(help="Reference: label image, QuPath GeoJSON, or a folder of them "
                                        "(matched to predictions by file stem); for classification a labels CSV "
                                        "(slide,label).", show_default=False)],
    classes: Annotated[str | None, typer.Option(
        "--classes", help="Class names of label ids 1, 2, ... (comma-separated); GeoJSON classifications are "
        "mapped by these names \\[default: the names found in the GeoJSON files].")] = None,
    downsample: Annotated[float, typer.Option(
        "--downsample", help="Level-0 px per compared pixel when GeoJSON is rasterised.")] = 1.0,
    size: Annotated[str | None, typer.Option(
        "--size", help="Level-0 WIDTHxHEIGHT of the area compared when both sides are GeoJSON \\[default: the "
        "objects' extent].", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (one line per pair, then the "
                                           "total) instead of a table.")] = False,
) -> None:
    """Dice and IoU per class of segmentations; accuracy, balanced accuracy and AUC of classifications.

    A labels CSV (slide,label) as the reference evaluates `wsi-amr classify` outputs, matched by slide stem.

    Example: wsi-amr evaluate out/slide/slide.geojson truth/slide.geojson --downsample 4

    Example: wsi-amr evaluate predictions/ glas/masks --classes Gland --json

    Example: wsi-amr evaluate out/ labels.csv --json
    """
    if ref.suffix.lower() == ".csv":
        _evaluate_classification(pred, ref, json_out)
        return
    names = [c.strip() for c in classes.split(",")] if classes else None
    if names is not None and (not all(names) or len(set(names)) != len(names)):
        fail(f"--classes must be distinct, non-empty names, got {classes!r}", 2)
    wh = None
    if size is not None:
        try:
            w, h = (int(v) for v in size.lower().split("x"))
            if w < 1 or h < 1:
                raise ValueError
            wh = (w, h)
        except ValueError:
            fail(f"--size must be WIDTHxHEIGHT in level-0 px, got {size!r}", 2)
    try:
        pairs, unmatched = match_pairs(pred, ref)
        if names is None:  # one class list for every pair, so the pooled counts add up
            names = classes_of([f for _, p, r in pairs for f in (r, p)]) or None
        rows: list[tuple[str, Scores]] = []
        total: np.ndarray | None = None
        for name, p, r in pairs:
            scores, conf = evaluate_pair(p, r, classes=names, downsample=downsample, size=wh)
            rows.append((name, scores))
            if total is None:
                total = conf
            else:
                k = max(total.shape[0], conf.shape[0])
                grown = np.zeros((k, k), np.int64)
                grown[: total.shape[0], : total.shape[0]] += total
                grown[: conf.shape[0], : conf.shape[0]] += conf
                total = grown
    except EvaluationError as exc:
        fail(flag_text(exc), 1)
    assert total is not None
    class_names = rows[0][1].classes
    k = total.shape[0]
    pooled_names = [class_names[i - 1] if i - 1 < len(class_names) else f"class {i}" for i in range(1, k)]
    pooled = scores_from_confusion(total, pooled_names)
    for name in unmatched:
        typer.echo(f"warning: {name}: on one side only, not compared", err=True)
    if json_out:
        for name, s in rows:
            typer.echo(json.dumps({"name": name, **_rounded(s.as_dict())}))
        summary = {"name": "all", "pairs": len(rows), "mean_dice_per_pair": round(float(np.mean([s.mean_dice for _, s in rows])), 6),
                   **_rounded(pooled.as_dict())}
        typer.echo(json.dumps(summary))
        return
    _table(rows, pooled if len(rows) > 1 else None)
    if len(rows) > 1:
        typer.echo(f"{len(rows)} pairs; mean Dice per pair {np.mean([s.mean_dice for _, s in rows]):.4f}, "
                   f"pooled {pooled.mean_dice:.4f}")


def _evaluate_classification(pred: Path, labels: Path, json_out: bool) -> None:
    from wsi_amr.ips.bags import BagError, read_labels_csv

    try:
        classes, predicted = read_predictions(pred)
        try:
            bags, label_names = read_labels_csv(labels, check_files=False)
        except BagError as exc:
            raise carry(EvaluationError(str(exc)), exc) from None
        unknown = sorted(set(label_names) - set(classes))
        if unknown:
            raise EvaluationError(f"{labels}: labels {unknown} are not classes of the predictions "
                                  f"({', '.join(classes)})")
        pairs = [(b.name, classes.index(label_names[b.label])) for b in bags if b.name in predicted]
        if not pairs:
            raise EvaluationError(f"no slide of {labels} has a prediction in {pred} (matched by slide stem)")
        y = np.array([label for _, label in pairs])
        p = np.stack([predicted[name] for name, _ in pairs])
        scores = classification_scores(y, p, classes)
    except EvaluationError as exc:
        fail(flag_text(exc), 1)
    for name in sorted({b.name for b in bags} ^ set(predicted)):
        typer.echo(f"warning: {name}: on one side only, not compared", err=True)
    if json_out:
        for (name, label), probs in zip(pairs, p):
            k = int(np.argmax(probs))
            typer.echo(json.dumps({"name": name, "label": classes[label], "predicted": classes[k],
                                   "correct": k == label, **_rounded({"probabilities": dict(zip(classes, map(float, probs)))})}))
        typer.echo(json.dumps({"name": "all", **_rounded(scores.as_dict())}))
        return
    _classification_table(scores)


def _classification_table(s: ClassificationScores) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    console = Console()
    table = Table(title=f"Classification: {s.n} slides", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("accuracy", fmt(s.accuracy))
    table.add_row("balanced accuracy", fmt(s.balanced_accuracy))
    table.add_row("AUC" if len(s.classes) == 2 else "AUC (one-vs-rest, macro)", fmt(s.auc))
    console.print(table)
    conf = Table(title="Confusion matrix (rows: label, columns: predicted)")
    conf.add_column("label \\ predicted")
    for c in s.classes:
        conf.add_column(c, justify="right")
    for c, row in zip(s.classes, s.confusion):
        conf.add_row(c, *(str(int(v)) for v in row))
    console.print(conf)


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    def r(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 6)
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        return v

    return {k: r(v) for k, v in d.items()}
