"""Write the synthetic phantom dataset (Decathlon layout) to a directory.

Usage: python data_scripts/make_phantoms.py OUT_DIR [--n-train 24] [--n-test 4] [--seed 0]
       [--shape 48 48 32] [--spacing 1.0 1.0 1.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seg_transfer.data.phantoms import make_phantom_dataset, make_phantom_volume  # noqa: E402

__all__ = ["make_phantom_dataset", "make_phantom_volume", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate a synthetic MRI-like phantom dataset (MSD layout).")
    p.add_argument("out_dir", type=Path, help="output directory (created if missing)")
    p.add_argument("--n-train", type=int, default=24, help="labelled training volumes (default 24)")
    p.add_argument("--n-test", type=int, default=4, help="unlabelled test volumes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 48, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.5], metavar=("SX", "SY", "SZ"))
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.n_train < 0 or args.n_test < 0 or min(args.shape) < 8 or min(args.spacing) <= 0:
        print("make_phantoms: counts must be >= 0, shape >= 8 and spacing > 0", file=sys.stderr)
        return 2
    out = make_phantom_dataset(args.out_dir, n_train=args.n_train, n_test=args.n_test,
                               shape=tuple(args.shape), spacing=tuple(args.spacing), seed=args.seed)
    print(f"wrote {args.n_train} training and {args.n_test} test phantoms to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
