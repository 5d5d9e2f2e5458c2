"""Reference values for Whittle's quantization arithmetic and calibrators, made once by hand and committed.

Run from the repository root (needs numpy and onnxruntime only):

    python3 scripts/make_calibration_fixture.py

Writes Tests/Fixtures/calibration/:
  histogram_<name>.npy     int64 bin counts (2048 bins of |x| over [0, T])
  reference.json           for each histogram: T, the observed min/max, and the thresholds of the percentile
                           (onnxruntime's rule), entropy (TensorRT's KL search, first bin set to the second) and MSE
                           calibrators computed here in numpy; plus scale/zero point pairs from onnxruntime's own
                           quant_utils.compute_scale_zp for a grid of ranges and types.
The Swift tests (Tests/WhittleCompressionTests/CalibrationReferenceTests.swift) must reproduce every number.
"""

import json
import pathlib

import numpy as np
from onnxruntime.quantization import quant_utils
from onnx import TensorProto

OUT = pathlib.Path(__file__).resolve().parents[1] / "Tests" / "Fixtures" / "calibration"
BINS = 2048


def percentile_threshold(hist, edges, p):
    """onnxruntime's HistogramCalibrater (percentile, symmetric): searchsorted on the normalised cdf."""
    cdf = np.cumsum(hist / hist.sum())
    i = np.searchsorted(cdf, p / 100.0)
    return float(edges[i])


def entropy_threshold(hist, edges, levels=128):
    """TensorRT's KL search (pytorch-quantization `_compute_amax_entropy`): the first bin (the spike of exact zeros
    after ReLU) takes the second bin's count before the search."""
    bins = hist.astype(np.float64)
    bins[0] = bins[1]
    n = len(bins)
    best, best_i = np.inf, levels
    for i in range(levels, n + 1):
        space = np.linspace(0, i, num=levels + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        mass = np.zeros(levels)
        counts = np.zeros(levels)
        for k, g in enumerate(digitized):
            if g != -1:
                mass[g] += bins[k]
                counts[g] += 1
        q = np.zeros(i)
        for k, g in enumerate(digitized):
            if g != -1:
                q[k] = mass[g] / counts[g]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(np.where(q > 0, p / np.where(q > 0, q, 1), np.inf)), 0.0)
        kl = float(np.sum(terms))
        if kl <= best:
            best, best_i = kl, i
    return float(edges[best_i])


def mse_threshold(hist, edges, qmax=127):
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_t = np.inf, float(edges[-1])
    for i in range(1, len(edges)):
        t = edges[i]
        if t <= 0:
            continue
        s = t / qmax
        q = np.clip(np.round(centres / s), -qmax, qmax) * s
        err = float(np.sum(hist * (q - centres) ** 2))
        if err < best:
            best, best_t = err, float(t)
    return best_t


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    samples = {
        "exponential": rng.exponential(1.0, 200000),
        "gaussian": rng.normal(0, 1, 200000),
        "relu_mixture": np.maximum(0, np.concatenate([rng.normal(0.5, 1, 150000), rng.normal(4, 2, 5000)])),
    }
    reference = {"histograms": {}, "scale_zero_point": []}
    for name, x in samples.items():
        x = x.astype(np.float32)
        t = float(np.abs(x).max())
        hist, edges = np.histogram(np.abs(x), bins=BINS, range=(0, t))
        np.save(OUT / f"histogram_{name}.npy", hist.astype(np.int64))
        reference["histograms"][name] = {
            "upper": t, "min": float(x.min()), "max": float(x.max()),
            "percentile_99_99": max(min(percentile_threshold(hist, edges, 99.99), float(x.max())), 0.0),
            "entropy": entropy_threshold(hist, edges),
            "mse": mse_threshold(hist, edges),
        }
    for rmin, rmax in [(-1.0, 2.0), (0.5, 3.0), (-7.25, -0.5), (0.0, 0.0), (-0.003, 0.001), (-100.0, 1e-3)]:
        for qtype, name in [(TensorProto.INT8, "int8"), (TensorProto.UINT8, "uint8")]:
            for symmetric in (False, True):
                qmin, qmax = quant_utils.get_qmin_qmax_for_qType(qtype, symmetric=symmetric)
                zp, scale = quant_utils.compute_scale_zp(np.array(rmin, dtype=np.float32), np.array(rmax, dtype=np.float32),
                                                         qmin, qmax, symmetric=symmetric)
                reference["scale_zero_point"].append({"min": rmin, "max": rmax, "type": name, "symmetric": symmetric,
                                                      "qmin": int(qmin), "qmax": int(qmax),
                                                      "scale": float(scale), "zero_point": int(zp)})
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(json.dumps(reference["histograms"], indent=1))


if __name__ == "__main__":
    main()
