"""Generate the procedural surface-defect demo dataset (numpy only, no torch).

Run from the repository root:

    python3 scripts/make_demo_data.py            # writes examples/data/
    python3 scripts/make_demo_data.py --out DIR --train 4000 --test 512 --holdout 16384

This was run once by hand; the test split (examples/data/defects_test_*.npy)
is committed, the train and holdout splits are git-ignored and can be
regenerated with this script at any time: the output is fully deterministic
(fixed seeds). A split of size 0 is not written.

The holdout split is a large third sample from the same generator: the
quality goals are judged on it, because on the 512 test images one image is
0.2 points and two models of equal accuracy differ by about a point.

Files written (C order, little-endian .npy):
    defects_train_x.npy  float32 (N_train, 3, 32, 32), values in [0, 1]
    defects_train_y.npy  int64   (N_train,)  0 ok, 1 scratch, 2 spot, 3 crack
    defects_test_x.npy   float32 (N_test, 3, 32, 32)
    defects_test_y.npy   int64   (N_test,)
    defects_holdout_x.npy, defects_holdout_y.npy  likewise (N_holdout)

The image generator lives in scripts/defects.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import defects  # noqa: E402

TRAIN_SEED = 20240601
TEST_SEED = 20240602
HOLDOUT_SEED = 20240603


def save(path: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<")))
    np.save(path, array)
    print(f"wrote {path}  {array.dtype} {array.shape}  {os.path.getsize(path)} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/data")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--holdout", type=int, default=16384)
    args = parser.parse_args()
    for option in ("train", "test", "holdout"):
        if getattr(args, option) < 0:
            parser.error(f"--{option} must be a number of images, 0 or more; got {getattr(args, option)}")

    os.makedirs(args.out, exist_ok=True)
    for split, n, seed in (("train", args.train, TRAIN_SEED), ("test", args.test, TEST_SEED),
                           ("holdout", args.holdout, HOLDOUT_SEED)):
        if n == 0:
            continue
        x, y = defects.make_dataset(n, seed)
        save(os.path.join(args.out, f"defects_{split}_x.npy"), x)
        save(os.path.join(args.out, f"defects_{split}_y.npy"), y.astype(np.int64))
        counts = np.bincount(y, minlength=len(defects.CLASS_NAMES))
        print(f"  {split}: class counts {dict(zip(defects.CLASS_NAMES, counts.tolist()))}")


if __name__ == "__main__":
    main()
