"""`coordinator model search` against onnxruntime: the chosen model passes onnx's checker, runs in onnxruntime with
the accuracy Whittle reports, stays within its MACs budget, and the search repeats itself for a seed; infeasible
budgets and bad flags are refused with the figure the user needs."""
import json

import numpy as np
import onnx
import onnxruntime as ort

from conftest import ROOT

DEMO_MODEL = ROOT / "examples" / "models" / "defect_cnn.onnx"
DEMO_X = ROOT / "examples" / "data" / "defects_test_x.npy"
DEMO_Y = ROOT / "examples" / "data" / "defects_test_y.npy"
# Whittle's reported accuracy of the written model against onnxruntime's on the same 512 images: one flipped
# prediction (a float summed in another order) is 0.195 points.
ACCURACY_TOLERANCE_POINTS = 0.2


def search(coordinator, tmp_path, name, *extra):
    out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
    coordinator("model", "search", DEMO_MODEL, "--calibration-data", DEMO_X, "--labels", DEMO_Y, "--candidates", 24,
                "--population", 8, "--out", out, "--report", report, *extra)
    return out, json.loads(report.read_text())


def runs_with_the_reported_accuracy(out, report):
    """onnxruntime runs the written model on the 512 demo images, 4 classes, with the accuracy Whittle reported."""
    x, y = np.load(DEMO_X), np.load(DEMO_Y)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert logits.shape == (len(x), 4)
    accuracy = float((logits.argmax(1) == y).mean())
    assert abs(100 * accuracy - 100 * report["finalAccuracy"]) <= ACCURACY_TOLERANCE_POINTS, (accuracy, report["finalAccuracy"])


def test_the_chosen_model_runs_in_onnxruntime_within_its_budget(coordinator, tmp_path):
    out, report = search(coordinator, tmp_path, "a", "--macs-budget", "40%", "--seed", 3)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    budget = report["budget"]["macs"]
    assert budget == int(report["base"]["macs"] * 0.4)
    assert report["chosen"]["macs"] <= budget and report["uniform"]["macs"] <= budget
    assert all(p["macs"] <= budget for p in report["front"])
    # The front: ascending MACs, each point with a lower loss than every cheaper one; the chosen is its fittest.
    losses = [p["loss"] for p in report["front"]]
    assert losses == sorted(losses, reverse=True) and losses[-1] == report["chosen"]["loss"]
    assert report["chosen"]["loss"] <= report["uniform"]["loss"]
    # Fewer parameters than the original, the same output shape, and the accuracy Whittle reported.
    original = onnx.load(str(DEMO_MODEL))
    count = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # noqa: E731
    assert count(model) < count(original)
    runs_with_the_reported_accuracy(out, report)
    # The same seed, the same search.
    _, again = search(coordinator, tmp_path, "b", "--macs-budget", "40%", "--seed", 3)
    assert again["chosen"] == report["chosen"] and again["front"] == report["front"]


def test_a_size_budget_bounds_the_parameters(coordinator, tmp_path):
    _, report = search(coordinator, tmp_path, "s", "--size-budget", "100KB", "--macs-budget", "60%")
    assert report["chosen"]["parameterBytes"] <= 100 * 1024
    assert report["chosen"]["macs"] <= report["budget"]["macs"]


def test_infeasible_budgets_and_bad_flags_are_refused(coordinator, tmp_path):
    out = tmp_path / "x.onnx"
    common = ["model", "search", DEMO_MODEL, "--calibration-data", DEMO_X, "--out", out]
    tiny = coordinator(*common, "--macs-budget", "1000", check=False)
    assert tiny.returncode != 0 and "below the smallest architecture" in tiny.stderr and "MACs" in tiny.stderr
    # The message names the smallest achievable MACs, which is a real architecture's figure.
    smallest = int(tiny.stderr.split("(")[1].split(" MACs")[0])
    assert 1000 < smallest < int(json.loads(coordinator("model", "inspect", DEMO_MODEL, "--json").stdout)["summary"]["macs"])
    for flags, needle in [([], "give a budget"), (["--macs-budget", "lots"], "not a count"),
                          (["--macs-budget", "150%"], "(0, 100]"), (["--size-budget", "40 parsecs"], "not a size"),
                          (["--macs-budget", "50%", "--finetune-epochs", "2"], "--train-data"),
                          (["--macs-budget", "50%", "--min-width", "0"], "--min-width")]:
        result = coordinator(*common, *flags, check=False)
        assert result.returncode != 0 and needle in result.stderr, (flags, result.stderr)
    assert not out.exists(), "a refused search writes nothing"


def test_a_latency_budget_is_kept_by_the_table_and_the_table_is_reused(coordinator, tmp_path):
    table = tmp_path / "latency.json"
    _, report = search(coordinator, tmp_path, "l", "--latency-budget", "60%", "--latency-batch", 4, "--latency-grid", 3,
                       "--latency-table", table)
    latency, budget = report["latency"], report["budget"]["latencyMs"]
    assert latency["batch"] == 4 and latency["cached"] is False and latency["tableSeconds"] > 0
    # The budget is 60 % of the original's end-to-end time in the table; every candidate is predicted under it.
    stored = json.loads(table.read_text())
    # Anchors: the uniform architectures at the grid's ladder fractions, timed end to end; the last is the original.
    assert [a["fraction"] for a in stored["anchors"]] == [0, 0.5, 1]
    full = stored["anchors"][-1]["milliseconds"]
    assert abs(budget - 0.6 * full) <= 1e-9 * budget
    assert report["chosen"]["latencyMs"] <= budget and report["uniform"]["latencyMs"] <= budget
    assert all(p["latencyMs"] <= budget for p in report["front"])
    front = [p["latencyMs"] for p in report["front"]]
    assert front == sorted(front)
    # One table entry per Conv and Gemm of the model, timed at a 3-point grid of output channels.
    layers = [n.name for n in onnx.load(str(DEMO_MODEL)).graph.node if n.op_type in ("Conv", "Gemm")]
    assert [entry["node"] for entry in stored["layers"]] == layers
    assert all(len(entry["outputs"]) <= 3 and min(min(row) for row in entry["milliseconds"]) > 0 for entry in stored["layers"])
    assert latency["chosenMeasuredMs"] > 0 and latency["baseMs"] > latency["chosenMeasuredMs"] * 0.5
    # The same model, machine, threads and batch: the table is read, not measured again, and predicts the same.
    _, again = search(coordinator, tmp_path, "l2", "--latency-budget", "60%", "--latency-batch", 4, "--latency-grid", 3,
                      "--latency-table", table)
    # Its predictions are re-anchored to the machine's speed now: the budget is 60 % of the original's time now.
    cached = again["latency"]
    assert cached["cached"] is True and cached["tableSeconds"] == 0 and cached["scale"] > 0
    assert abs(again["budget"]["latencyMs"] - 0.6 * full * cached["scale"]) <= 1e-9 * budget
    assert again["chosen"]["latencyMs"] <= again["budget"]["latencyMs"]
    # Another batch: the stored table does not apply; it is measured again and replaced.
    _, other = search(coordinator, tmp_path, "l3", "--latency-budget", "60%", "--latency-batch", 2, "--latency-grid", 3,
                      "--latency-table", table)
    assert other["latency"]["cached"] is False and json.loads(table.read_text())["batch"] == 2


def test_bad_latency_budgets_and_tables_are_refused(coordinator, tmp_path):
    out = tmp_path / "x.onnx"
    common = ["model", "search", DEMO_MODEL, "--calibration-data", DEMO_X, "--out", out, "--latency-grid", 2]
    for flags, needle in [(["--latency-budget", "2 parsecs"], "not a latency"), (["--latency-budget", "0%"], "(0, 100]"),
                          (["--latency-budget", "1us"], "below the smallest architecture"),
                          (["--latency-budget", "50%", "--latency-batch", "0"], "--latency-batch")]:
        result = coordinator(*common, *flags, check=False)
        assert result.returncode != 0 and needle in result.stderr, (flags, result.stderr)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"machine": 3}')
    result = coordinator(*common, "--latency-budget", "50%", "--latency-table", corrupt, check=False)
    assert result.returncode != 0 and "not a latency table" in result.stderr
    assert corrupt.read_text() == '{"machine": 3}', "a table that cannot be read is left as it was"
    assert not out.exists(), "a refused search writes nothing"


RESNET = ROOT / "examples" / "models" / "resnet18_demo.onnx"


def smallest_macs(stderr):
    assert "below the smallest architecture" in stderr, stderr
    return int(stderr.split("smallest architecture of the search space (")[1].split(" MACs")[0])


def test_skip_blocks_leave_a_resnet_that_onnxruntime_runs(coordinator, tmp_path):
    """--skip-blocks on the ResNet-18 fixture under a budget below its narrowest architecture that keeps every block:
    every candidate must skip blocks, and the chosen model, without those blocks' Adds, runs in onnxruntime with the
    accuracy Whittle reports. A model without residual blocks is refused."""
    out, report_path = tmp_path / "skipped.onnx", tmp_path / "skipped.json"
    common = ["model", "search", RESNET, "--calibration-data", DEMO_X, "--labels", DEMO_Y, "--out", out]
    kept = smallest_macs(coordinator(*common, "--macs-budget", "1000", check=False).stderr)
    skipping = smallest_macs(coordinator(*common, "--macs-budget", "1000", "--skip-blocks", check=False).stderr)
    assert 1000 < skipping < kept
    coordinator(*common, "--macs-budget", kept - 1, "--skip-blocks", "--candidates", 16, "--population", 8,
                "--report", report_path)
    report = json.loads(report_path.read_text())
    skipped = [name for name, width in report["chosen"]["widths"].items() if width == 0]
    assert skipped and report["chosen"]["macs"] < kept
    assert all(p["macs"] < kept and 0 in p["widths"].values() for p in report["front"])
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    adds = lambda m: sum(n.op_type == "Add" for n in m.graph.node)  # noqa: E731
    assert adds(model) == adds(onnx.load(str(RESNET))) - len(skipped)
    runs_with_the_reported_accuracy(out, report)
    plain = coordinator("model", "search", DEMO_MODEL, "--calibration-data", DEMO_X, "--macs-budget", "50%",
                        "--skip-blocks", "--out", tmp_path / "plain.onnx", check=False)
    assert plain.returncode != 0 and "no residual block" in plain.stderr, plain.stderr
