"""Training curves: ``<run>/curves.png`` drawn from ``<run>/metrics.jsonl`` (matplotlib, no pyplot state).

Panels, against the step: the training loss (total, and per teacher on the images that had it), the
learning rate, and, when the run evaluated its held-out images (``eval_every`` with ``data.holdout``),
the held-out cosine fidelity per teacher (patch solid, CLS dashed). A resumed run logs again the steps
after its last checkpoint; the last record of a step is the one drawn. The trainer redraws the file at
every checkpoint and at the end (a failure is logged, never fatal); ``dune-student curves RUN`` redraws it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..runs.layout import CURVES, METRICS

log = logging.getLogger(__name__)

FIDELITY_PREFIX = "fidelity/"       # held-out records: fidelity/<teacher>/patch, fidelity/<teacher>/cls
PANEL_INCHES = (5.0, 3.5)
DPI = 100                           # a panel is 500 x 350 pixels


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Training records (with ``loss``) and held-out records (with ``fidelity/...`` keys) of a run, each
    sorted by step, the last record of a step kept."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS} (is it a training run directory?)")
    train, held_out = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from None
        if "loss" in record:
            train[record["step"]] = record
        elif any(key.startswith(FIDELITY_PREFIX) for key in record):
            held_out[record["step"]] = record
    return [train[s] for s in sorted(train)], [held_out[s] for s in sorted(held_out)]


def draw_series(axes, records: list[dict], key: str, **style) -> None:
    """Plot ``key`` against the step over the records that have a number for it (nothing, and no legend
    entry, when none has: e.g. the CLS of a teacher whose CLS is not distilled)."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if points:
        axes.plot([s for s, _ in points], [v for _, v in points], **style)


def plot_curves(run_dir: str | Path) -> Path:
    """Draw ``<run_dir>/curves.png`` (``500·P x 350`` pixels for P panels: 2, or 3 with held-out
    fidelity); written atomically. Raises if the run has no training records."""
    from matplotlib.figure import Figure

    train, held_out = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{run_dir}/{METRICS} has no training records yet")
    teachers = sorted({key.removeprefix("loss/") for r in train for key in r if key.startswith("loss/")})
    panels = 3 if held_out else 2
    figure = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    loss, lr, *rest = figure.subplots(1, panels)
    draw_series(loss, train, "loss", color="black", linewidth=2, label="total (weighted)")
    for k, teacher in enumerate(teachers):
        draw_series(loss, train, f"loss/{teacher}", color=f"C{k}", label=teacher)
    draw_series(lr, train, "lr", color="tab:gray")
    for axes, title in ((loss, "training loss"), (lr, "learning rate")):
        axes.set(title=title, xlabel="step")
    loss.legend(fontsize="small")
    for axes in rest:
        for k, teacher in enumerate(teachers):
            draw_series(axes, held_out, f"{FIDELITY_PREFIX}{teacher}/patch", color=f"C{k}", marker="o",
                        label=f"{teacher} patch")
            draw_series(axes, held_out, f"{FIDELITY_PREFIX}{teacher}/cls", color=f"C{k}", marker="o",
                        linestyle="--", label=f"{teacher} cls")
        axes.set(title="held-out cosine fidelity", xlabel="step")
        axes.legend(fontsize="small")
    out = Path(run_dir) / CURVES
    tmp = out.with_name(CURVES + ".tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(out)
    return out


def write_curves_safely(run_dir: str | Path) -> Path | None:
    """:func:`plot_curves`, logging a warning instead of raising (training must never die of a plot)."""
    try:
        return plot_curves(run_dir)
    except Exception as exc:  # noqa: BLE001 -- any plotting failure is reported and ignored
        log.warning("could not draw %s/%s: %s", run_dir, CURVES, exc)
        return None
