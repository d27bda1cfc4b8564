"""Why a demo student's held-out fidelity is what it is: fidelity per image group (clip, photos) on the training
and held-out images, where its CLS predictions point, and what constant predictors score, all in the run's
standardised target space (issue 24's diagnosis of a negative held-out CLS cosine).

    python tools/demo_diagnose.py --demo demo [--run demo/run] [--largest-clip bikes]

Prints, per teacher: CLS and patch fidelity per group of training and held-out images; the direction ``m`` of
the mean standardised CLS target of the largest training clip (``--largest-clip``; in the standardised space
the whole training set's mean is the origin, so ``m`` is that clip's offset from it), the cosine of the held-out
CLS targets and of the student's CLS predictions to ``m``, and what predicting ``m`` itself scores; the score of
the nearest training CLS target (what a student that memorised the training set could reach); the norms of the
CLS predictions and targets; the per-position mean patch target's held-out score; the raw-space (not
standardised) cosine of the training mean, for comparison.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dune_cache import CacheReader, load_pixels
from dune_student.data.batches import image_paths
from dune_student.runs.loading import LoadedRun, load_run, project


@torch.inference_mode()
def tokens(run: LoadedRun, cache: Path, images: Path) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """Image ids and, per teacher, standardised targets and the student's predictions: ``tc`` ``(N, D)``, ``tp``
    ``(N, h, w, D)``, ``pc``, ``pp`` alike."""
    reader = CacheReader(str(cache), run.teachers)
    paths, size = image_paths(reader, str(images)), (run.resolution, run.resolution)
    parts = {t: {"tc": [], "tp": [], "pc": [], "pp": []} for t in run.teachers}
    for lo in range(0, len(reader), 16):
        batch = np.arange(lo, min(lo + 16, len(reader)))
        pixels = torch.stack([torch.from_numpy(load_pixels(paths[i], size, "squash")) for i in batch])
        targets, preds = reader.read(batch), project(run, pixels, reader.grids)
        for t in run.teachers:
            cls, patch = run.standardizer.standardize(t, targets.cls[t], targets.patch[t])
            for key, value in (("tc", cls), ("tp", patch), ("pc", preds[t][0]), ("pp", preds[t][1])):
                parts[t][key].append(value.float())
    return reader.image_ids, {t: {k: torch.cat(v) for k, v in p.items()} for t, p in parts.items()}


def group(image_id: str) -> str:
    """``frames/bikes_0010.png`` -> ``bikes``; any photo -> ``photos``."""
    return Path(image_id).stem.rsplit("_", 1)[0] if image_id.startswith("frames/") else "photos"


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image cosine: CLS ``(N, D)`` -> ``(N,)``; patches ``(N, h, w, D)`` -> mean over tokens ``(N,)``."""
    c = F.cosine_similarity(a, b, dim=-1)
    return c if c.dim() == 1 else c.flatten(1).mean(1)


def by_group(ids: list[str], d: dict[str, torch.Tensor]) -> str:
    """``group (n) CLS x patch y`` for every group of ``ids``."""
    cls, patch, parts = cosine(d["pc"], d["tc"]), cosine(d["pp"], d["tp"]), []
    for name in dict.fromkeys(group(i) for i in ids):
        rows = [k for k, i in enumerate(ids) if group(i) == name]
        parts.append(f"{name} (n={len(rows)}) CLS {cls[rows].mean():+.3f} patch {patch[rows].mean():+.3f}")
    return f"CLS {cls.mean():+.3f} patch {patch.mean():+.3f}; " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("demo"))
    parser.add_argument("--run", type=Path, default=None, help="run folder (default: DEMO/run)")
    parser.add_argument("--largest-clip", default="bikes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = load_run((args.run or args.demo / "run") / "checkpoint.pt", torch.device("cpu"))
    train_ids, train = tokens(run, args.demo / "train.zarr", args.demo / "train")
    held_ids, held = tokens(run, args.demo / "heldout.zarr", args.demo / "heldout")
    clip = [k for k, i in enumerate(train_ids) if group(i) == args.largest_clip]
    print(f"{len(clip)} of {len(train_ids)} training images are frames of {args.largest_clip}")
    for t in run.teachers:
        tr, he = train[t], held[t]
        m = tr["tc"][clip].mean(0)
        nearest = (F.normalize(he["tc"], dim=-1) @ F.normalize(tr["tc"], dim=-1).T).max(1).values
        raw_train, raw_held = (run.standardizer.destandardize(t, d["tc"], d["tp"]) for d in (tr, he))
        print(f"== {t}\n training images: {by_group(train_ids, tr)}\n held-out images: {by_group(held_ids, he)}")
        print(f" m = mean standardised CLS target of {args.largest_clip} (norm {m.norm():.2f}; a target's norm is "
              f"{tr['tc'].norm(dim=1).mean():.1f} on average, the training mean's {tr['tc'].mean(0).norm():.1e}):")
        print(f"   cos(held-out CLS target, m) {cosine(he['tc'], m[None]).mean():+.3f}; cos(student's held-out CLS "
              f"prediction, m) {cosine(he['pc'], m[None]).mean():+.3f}; on the {args.largest_clip} frames "
              f"{cosine(tr['pc'][clip], m[None]).mean():+.3f}")
        print(f"   norm of the student's held-out CLS predictions {he['pc'].norm(dim=1).mean():.2f} vs the targets' "
              f"{he['tc'].norm(dim=1).mean():.2f}")
        print(f" nearest training CLS target (a memorising student): held-out CLS {nearest.mean():+.3f}")
        positional = cosine(tr["tp"].mean(0)[None], he["tp"]).mean()
        print(f" mean patch target per grid position: held-out patch {positional:+.3f}"
              " (the global mean patch target, the origin, scores 0)")
        print(f" raw teacher space: the training mean scores held-out CLS "
              f"{cosine(raw_held[0], raw_train[0].mean(0)[None]).mean():+.3f}, patch "
              f"{cosine(raw_held[1], raw_train[1].mean((0, 1, 2))[None, None, None]).mean():+.3f}")


if __name__ == "__main__":
    main()
