"""Write the demo datasets (two-digit images from scikit-learn's digits) to a folder.

    python tools/make_demo_data.py data/demo --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.data.demo_data import DemoSpec, make_demo_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (gets imagenet/ and datacomp/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--captioned", type=int, default=1000)
    args = parser.parse_args()
    spec = DemoSpec(args.seed, args.train_per_class, args.val_per_class, args.captioned)
    print(make_demo_data(args.out, spec))


if __name__ == "__main__":
    main()
