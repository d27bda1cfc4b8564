"""The files a run folder (``dune-student train --out RUN``) holds, by name: one source for every module that
writes or reads them."""
from __future__ import annotations

CHECKPOINT = "checkpoint.pt"   # everything needed to resume bit for bit (dune_student.runs.checkpoint)
METRICS = "metrics.jsonl"      # one JSON record per logged step and per held-out evaluation
CURVES = "curves.png"          # drawn from METRICS (dune_student.evaluation.curves)
CONFIG = "config.json"         # the run's configuration and the values it resolved
