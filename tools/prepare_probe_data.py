"""Write the probe data folder of ``dune-student probe`` from data bundled with scikit-image (offline).

    python tools/prepare_probe_data.py --out demo/probe
writes demo/probe/classify/{face,nonface}/*.png (LFW subset) and demo/probe/pairs/*/ (windows of the Middlebury
Motorcycle stereo pair with ground-truth disparity); see dune_demo/probe_data.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dune_demo.probe_data import write_probe_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="probe data folder to write")
    out = write_probe_data(parser.parse_args().out)
    images = sorted((out / "classify").glob("*/*.png"))
    pairs = sorted(p for p in (out / "pairs").iterdir() if p.is_dir())
    print(f"{len(images)} labelled images and {len(pairs)} stereo pairs in {out}")


if __name__ == "__main__":
    main()
