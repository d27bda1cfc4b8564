"""The demo's score table and its reading, from `dune-student eval --baselines --json` and `dune-student probe`'s
JSON report: held-out fidelity of the student beside a random-init student and the mean training target, probe
scores beside the teachers, a random-init student, raw pixels and identity, each with a 95 % bootstrap interval,
and one line per teacher in words. Used by tools/run_demo.py and tools/demo_compute_curve.py.

Uncertainty: every interval is a percentile bootstrap over the test items (held-out images for fidelity, warp
pairs for PCK, held-out stereo pairs for disparity;
``dune_student.evaluation.probe_scores.bootstrap_indices``); a comparison "A beats B" is the bootstrap interval of the
paired difference A - B on the same resamples, and counts only when that interval lies above 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dune_student.evaluation.probe_scores import mean_samples, percentile_interval, pooled_share_samples, r2_samples

RANDOM_INIT, MEAN_TARGET = "random-init student", "mean training target"


@dataclass
class Score:
    """One number of the table: ``value``, its per-item results ``items`` and ``resample``, which turns them into
    bootstrap samples of the statistic. The bootstrap draws depend only on the item count, so two scores over
    the same items are resampled alike and the difference of their samples is the paired difference's."""

    value: float
    items: np.ndarray
    resample: Callable[[np.ndarray], np.ndarray]

    def interval(self) -> list[float]:
        return percentile_interval(self.resample(self.items))

    def minus(self, other: "Score") -> tuple[float, list[float]]:
        """``(self - other, 95 % interval of the paired difference)``."""
        return self.value - other.value, percentile_interval(self.resample(self.items) - other.resample(other.items))


def mean_score(values: list[float] | None) -> Score | None:
    """Mean of per-item ``values`` (e.g. held-out images' cosines), bootstrapped over the items."""
    if values is None:
        return None
    items = np.asarray(values, np.float64)
    return Score(float(items.mean()), items, mean_samples)


def pck_score(correspondence: dict, threshold: str = "1") -> Score:
    """PCK at ``threshold`` patches, bootstrapped over the warp pairs (their query counts are the same for every
    model: they depend on the homographies only)."""
    hits, queries = np.asarray(correspondence["pair_hits"][threshold], np.float64), correspondence["pair_queries"]
    return Score(hits.sum() / max(sum(queries), 1), hits, lambda h: pooled_share_samples(h, queries))


def r2_score(disparity: dict | None) -> Score | None:
    """Disparity R², bootstrapped over the held-out stereo pairs."""
    if disparity is None:
        return None
    targets, pairs = disparity["test_targets"], disparity["test_pair"]
    return Score(disparity["r2"], np.asarray(disparity["test_errors"], np.float64),
                 lambda errors: r2_samples(errors, targets, pairs))


# Summary columns -> (how to read the score from a probe.json model, scale of the value). Face/non-face
# classification is not among them: on its 25 x 25 LFW crops a raw-pixel thumbnail classifies as well as the
# teachers (kNN 91 % vs 92-93 %, linear 96 % vs 98 %, within the intervals), so it cannot tell features apart; its
# scores stay in probe.json and `dune-student probe`'s table.
PROBES = {
    "warp PCK ≤1 patch %": (lambda m: pck_score(m["correspondence"]), 100),
    "disparity R²": (lambda m: r2_score(m["disparity"]), 1),
}


def cell(score: Score | None, scale: float) -> str:
    """``value [low, high]`` (95 % interval), or — when there is no such score."""
    if score is None:
        return "—"
    low, high = score.interval()
    digits = 1 if scale == 100 else 3
    return f"{scale * score.value:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def probe_model(probe: dict, kind: str, suffix: str = "") -> dict | None:
    """The first model of a probe report of ``kind`` whose name ends with ``suffix``."""
    return next((m for m in probe["models"] if m["kind"] == kind and m["name"].endswith(suffix)), None)


def probe_scores(model: dict | None) -> dict[str, Score | None]:
    return {column: (read(model) if model else None) for column, (read, _) in PROBES.items()}


def fidelity_scores(entry: dict | None) -> tuple[Score | None, Score | None]:
    """(CLS, patch) fidelity of one row of an eval result (None where not distilled or not applicable)."""
    if entry is None:
        return None, None
    return mean_score(entry["cls_per_image"]), mean_score(entry["patch_per_image"])


def baseline_entry(fidelity: dict, teacher: str, name: str) -> dict | None:
    """The eval baseline row of ``teacher`` whose name starts with ``name``."""
    return next((row for key, row in fidelity[teacher]["baselines"].items() if key.startswith(name)), None)


@dataclass
class Row:
    name: str
    cls: Score | None
    patch: Score | None
    probes: dict[str, Score | None]

    def cells(self) -> list[str]:
        return [self.name, cell(self.cls, 1), cell(self.patch, 1),
                *(cell(self.probes[c], scale) for c, (_, scale) in PROBES.items())]


def table_rows(teachers: list[str], fidelity: dict, probe: dict) -> dict[str, Row]:
    """Every row of the table by name, in table order: per teacher the teacher, the student's projection for it,
    a random-init student's and the mean training target; then the student's own tokens, the random-init
    student's, raw pixels and identity."""
    rows = {}
    for t in teachers:
        rows[f"teacher {t}"] = Row(f"teacher {t}", None, None, probe_scores(probe_model(probe, "teacher", t)))
        rows[f"student → {t}"] = Row(f"student → {t}", *fidelity_scores(fidelity[t]),
                                     probe_scores(probe_model(probe, "student head", f"→ {t}")))
        for name in (RANDOM_INIT, MEAN_TARGET):
            rows[f"{name} → {t}"] = Row(f"{name} → {t}", *fidelity_scores(baseline_entry(fidelity, t, name)),
                                        probe_scores(None))
    own = (("student", "student (its own tokens)"), ("random init", "random-init student (its own tokens)"),
           ("pixels", "raw pixels"), ("identity", "identity (same position)"))
    for kind, label in own:
        rows[label] = Row(label, None, None, probe_scores(probe_model(probe, kind)))
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def beats(a: Score | None, b: Score | None) -> bool | None:
    """Whether ``a`` beats ``b`` beyond the uncertainty (the paired difference's 95 % interval above 0); None when
    either is missing."""
    return None if a is None or b is None else a.minus(b)[1][0] > 0


def difference_words(a: Score, b: Score, scale: float) -> str:
    difference, (low, high) = a.minus(b)
    digits = 1 if scale == 100 else 3
    return f"{scale * difference:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"


def fidelity_words(rows: dict[str, Row], teacher: str) -> str:
    """The student's held-out fidelity for ``teacher`` against both baselines, in words."""
    student = rows[f"student → {teacher}"]
    parts = []
    for kind in ("cls", "patch"):
        mine = getattr(student, kind)
        if mine is None:
            continue
        others = {name: getattr(rows[f"{name} → {teacher}"], kind) for name in (RANDOM_INIT, MEAN_TARGET)}
        learned = all(beats(mine, other) for other in others.values())
        versus = "; ".join(f"student − {name}: {difference_words(mine, other, 1)}" for name, other in others.items())
        parts.append(f"{kind.upper() if kind == 'cls' else kind} {mine.value:.3f} ({versus}): "
                     + ("learned" if learned else "not learned at this budget"))
    return "held-out fidelity " + "; ".join(parts)


def probe_words(rows: dict[str, Row], teacher: str, student_row: str) -> str:
    """Per probe, the share of the teacher's margin over the random-init student that ``student_row`` recovered,
    and whether its gain over random init is beyond the uncertainty."""
    teacher_row, student, random = (rows[f"teacher {teacher}"], rows[student_row],
                                    rows["random-init student (its own tokens)"])
    parts = []
    for column, (_, scale) in PROBES.items():
        mine, theirs, base = student.probes[column], teacher_row.probes[column], random.probes[column]
        if mine is None or theirs is None or base is None:
            continue
        margin = theirs.value - base.value
        share = f"{100 * (mine.value - base.value) / margin:.0f} %" if margin > 0 else "n/a (no teacher margin)"
        verdict = "learned" if beats(mine, base) else "not learned at this budget"
        parts.append(f"{column.rsplit(' %', 1)[0]}: recovered {share} of the teacher's margin over random init "
                     f"(student − random init {difference_words(mine, base, scale)}: {verdict})")
    return "; ".join(parts)


def probe_check(rows: dict[str, Row], teachers: list[str]) -> list[str]:
    """Per probe column: does every teacher beat the random-init student and each trivial baseline (raw pixels,
    identity where it has the score) beyond the uncertainty?"""
    baselines = ["random-init student (its own tokens)", "raw pixels", "identity (same position)"]
    lines = []
    for column, (_, scale) in PROBES.items():
        checks = []
        for t in teachers:
            for b in baselines:
                mine, other = rows[f"teacher {t}"].probes[column], rows[b].probes[column]
                if mine is not None and other is not None:
                    checks.append((t, b, beats(mine, other), difference_words(mine, other, scale)))
        passed = all(ok for *_, ok, _ in checks)
        details = "; ".join(f"{t} − {b} {words}" for t, b, _, words in checks)
        lines.append(f"- {column.rsplit(' %', 1)[0]}: " + ("every teacher beats every baseline" if passed else
                                                           "NOT every teacher beats every baseline") + f" ({details})")
    return lines


HEADER = ["model", "held-out CLS cosine", "held-out patch cosine", *PROBES]


def score_table(teachers: list[str], fidelity: dict, probe: dict) -> tuple[list[str], dict[str, Row]]:
    """The table's markdown lines and its rows."""
    rows = table_rows(teachers, fidelity, probe)
    return markdown_table(HEADER, [row.cells() for row in rows.values()]), rows


def reading(teachers: list[str], rows: dict[str, Row]) -> list[str]:
    """What the table shows, one line per teacher, then the probes' check against their baselines."""
    lines = [f"- **{t}**: {fidelity_words(rows, t)}. Probes of the student's projection for it — "
             f"{probe_words(rows, t, f'student → {t}')}." for t in teachers]
    lines.append(f"- **the student's own tokens** (what `dune-student export` gives), against {teachers[0]}'s "
                 f"margin — {probe_words(rows, teachers[0], 'student (its own tokens)')}.")
    return lines + ["", "Probe check (each teacher against the random-init student, raw pixels and identity, paired "
                        "differences with 95 % intervals):", *probe_check(rows, teachers)]
