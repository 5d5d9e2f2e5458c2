"""Training end to end: a small CNN trained from random initialisation by `coordinator model train` on the
procedurally generated defect-inspection task, and the accuracy Whittle reports confirmed by onnxruntime on the
exported model."""
import json

import numpy as np
import onnxruntime as ort

from conftest import ROOT

# Stated accuracy for this run (4 classes, chance 25 %): the seed makes the run deterministic, so the figure is
# reproducible; the bound leaves room for summation-order differences between machines.
MINIMUM_ACCURACY = 0.60


def test_small_cnn_learns_and_onnxruntime_agrees(release_models, tmp_path):
    data = ROOT / "examples" / "data"
    train_x = np.load(data / "defects_train_x.npy") if (data / "defects_train_x.npy").exists() else None
    if train_x is None:
        # The training split is regenerated (it is not committed): numpy-only generator.
        import subprocess, sys
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py")], check=True, cwd=ROOT)
        train_x = np.load(data / "defects_train_x.npy")
    train_y = np.load(data / "defects_train_y.npy")
    np.save(tmp_path / "x.npy", train_x[:2000])
    np.save(tmp_path / "y.npy", train_y[:2000])
    out = tmp_path / "trained.onnx"
    result = release_models(
        "model", "train", ROOT / "examples/models/defect_cnn.onnx", "--reinitialize", "--seed", "0",
        "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--epochs", "6", "--optimizer", "adamw",
        "--lr", "0.003", "--weight-decay", "0.01", "--schedule", "cosine", "--out", out,
        "--val-data", data / "defects_test_x.npy", "--val-labels", data / "defects_test_y.npy", "--json")
    report = json.loads(result.stdout)
    epochs = report["epochs"]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    reported = epochs[-1]["validationAccuracy"]
    assert reported >= MINIMUM_ACCURACY, f"validation accuracy {reported}"

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x, y = np.load(data / "defects_test_x.npy"), np.load(data / "defects_test_y.npy")
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert float((logits.argmax(1) == y).mean()) == reported


def test_train_refuses_bad_input(coordinator, tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "bad_labels.npy", np.array([0, 1, 2, 9, 0, 1, 2, 3], dtype=np.int64))
    np.save(tmp_path / "short_labels.npy", np.array([0, 1], dtype=np.int64))
    model = ROOT / "examples/models/defect_cnn.onnx"
    for labels, message in (("bad_labels.npy", "label 9"), ("short_labels.npy", "one label per sample")):
        result = coordinator("model", "train", model, "--data", tmp_path / "x.npy", "--labels", tmp_path / labels,
                             "--epochs", "1", "--out", tmp_path / "o.onnx", "--batch-size", "8", check=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    result = coordinator("model", "train", model, "--data", tmp_path / "nan.npy", "--labels", tmp_path / "bad_labels.npy",
                         "--epochs", "1", "--out", tmp_path / "o.onnx", check=False)
    assert result.returncode == 1 and "non-finite" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_demo_data_generator_refuses_negative_sizes_and_skips_empty_splits(tmp_path):
    """A negative split size is refused with a clear message; a size of 0 writes nothing for that split."""
    import subprocess
    import sys
    script = ROOT / "scripts" / "make_demo_data.py"
    bad = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "bad"), "--holdout", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--holdout must be a number of images, 0 or more; got -1" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "small"), "--train", "0", "--test", "8",
                         "--holdout", "0"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["defects_test_x.npy", "defects_test_y.npy"]
    assert np.load(tmp_path / "small" / "defects_test_x.npy").shape == (8, 3, 32, 32)
