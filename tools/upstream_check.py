"""What the ``check_upstream_<family>.py`` tools share: seeded random weights, the test photo, and the ending (worst
difference, JSON record, exit status)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

THRESHOLD = 1e-4  # the exactness target of docs/teachers.md
LAYER_SCALE_NAMES = ("gamma", "grandma", "lambda1")  # timm/DINOv2 LayerScale; RADIO's "grandma"; transformers' lambda1


def randomize(model: torch.nn.Module, seed: int, unit_scale: Callable[[str, torch.Tensor], bool]) -> None:
    """Every parameter seeded-random, in ``named_parameters`` order: LayerScale (``*gamma``/``*grandma``/``*lambda1``)
    N(0.5, 0.1), norm weights 1 + N(0, 0.1), parameters for which ``unit_scale(name, p)`` holds N(0, 1), the rest
    N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(LAYER_SCALE_NAMES):
                p.copy_(0.5 + 0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise if unit_scale(name, p) else 0.02 * noise)


def photo_pixels(height: int, width: int) -> torch.Tensor:
    """scikit-image's astronaut photo resized (bicubic) to ``(1, 3, height, width)`` uint8."""
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous()


def report(upstream: str, commit: str, rows: list[dict], token_keys: tuple[str, ...], cpu_start: float,
           out: Path | None) -> None:
    """Print the worst max abs diff over ``rows`` (each with a float per name in ``token_keys``), write the JSON
    record (upstream, commit, torch, CPU seconds since ``cpu_start``, rows) to ``out``, and exit non-zero when the
    worst exceeds :data:`THRESHOLD`."""
    worst = max(max(r[key] for key in token_keys) for r in rows)
    result = {"upstream": upstream, "commit": commit, "torch": torch.__version__,
              "cpu_seconds": round(time.process_time() - cpu_start, 1), "max_abs_diff": worst, "rows": rows}
    print(f"worst max abs diff {worst:.2e} over {len(rows)} comparisons; {result['cpu_seconds']} CPU-s")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    if worst > THRESHOLD:
        raise SystemExit(f"max abs diff {worst:.2e} exceeds {THRESHOLD:g}")
