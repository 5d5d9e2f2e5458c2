"""Federated compression rounds end to end: a real coordinator and real worker processes on loopback over mutual
TLS, each worker with its own non-IID shard of the shipped defect-inspection images."""
import json
import signal
import subprocess
import time

import numpy as np
import onnxruntime as ort
import pytest

from rounds_support import MODEL, Fleet, non_iid_shards, load_holdout_split, load_test_split, load_train_split

# Quality goals of issue 6, in accuracy points against the base model.
INT8_LOSS_POINTS = 0.3
PRUNED_SHRINK_FACTOR = 10
# The goal for 50 % pruning + federated fine-tuning + int8 is 1.5 points, judged on the 16,384 holdout images (on
# the 512 test images two models of equal accuracy differ by about a point, which had made earlier recipes look
# better than they were). Recipe: L1 channel pruning, 150 FedAvg rounds x 2 local epochs of SGD at 0.01 annealed per
# epoch, dihedral augmentation, distillation; 4 non-IID workers, half without labels; about 330 s of round on 2
# cores. Measured with benchmarks/pruning_quality.py (seeds 0 / 1): 150 rounds lose 1.10 / 0.87; 100 rounds
# 1.32 / 1.48; 80 rounds 1.41 / 1.35; 20 rounds 2.03 / 2.31. Two runs of one recipe differ by about 0.1 point, so
# 150 rounds leave the test a margin. It asserts the goal itself.
PRUNED_INT8_GOAL_POINTS = 1.5
# Federated fine-tuning after pruning: rounds and local epochs.
ROUNDS = "150"
LOCAL_EPOCHS = "2"
# A continual round (no pruning) must keep the model near the base model's 90 %.
CONTINUAL_MINIMUM_ACCURACY = 0.85




def make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, workers=4, labels=True, samples=None,
               **settings):
    server = coordinator_server("coord", **{"heartbeat_seconds": 1, **settings})
    fleet = Fleet(server, worker_path, tmp_path, spawn_any)
    names = [f"camera-{k}" for k in range(workers)]
    fleet.enroll(names)
    x, y = load_train_split()
    tx, ty = load_test_split()
    train_shards = non_iid_shards(y, workers)
    test_shards = non_iid_shards(ty, workers, seed=1)
    for k, name in enumerate(names):
        part = train_shards[k][:samples] if samples else train_shards[k]
        fleet.write_shard(name, x[part], y[part] if labels else None, tx[test_shards[k]], ty[test_shards[k]])
    return fleet, names


def onnx_accuracy(path, x, y):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 128]})[0] for i in range(0, len(x), 128)])
    return float((logits.argmax(1) == y).mean()), logits.argmax(1)


def test_minmax_round_ranges_equal_local_compress_on_the_union(coordinator_server, worker_path, tmp_path,
                                                              spawn_any, release_models):
    """Exactness: with no pruning, the federated calibration equals `model compress` on the union of the shards,
    range for range and byte for byte; onnxruntime runs the fetched model within the int8 quality goal."""
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any)
    for name in names:
        fleet.start_worker(name)
    started = fleet.round("start", "--model", MODEL, "--quantize", "int8", "--calibration", "entropy", "--reduce-range",
                          "--min-workers", "4", "--phase-deadline", "5m", "--json")
    round_id = json.loads(started.stdout)["id"]
    status = fleet.wait(round_id, timeout=300)
    assert status["state"] == "succeeded", status
    out, report_path = tmp_path / "round.onnx", tmp_path / "round.json"
    fleet.round("fetch", round_id, "--out", out, "--report", report_path)
    report = json.loads(report_path.read_text())

    union = np.concatenate([np.load(fleet.workers[n]["x"]) for n in names])
    np.save(tmp_path / "union.npy", union)
    local_report = tmp_path / "local.json"
    release_models("model", "compress", MODEL, "--calibration-data", tmp_path / "union.npy", "--out",
                   tmp_path / "local.onnx", "--quantize", "int8", "--calibration", "entropy", "--reduce-range",
                   "--report", local_report)
    local = json.loads(local_report.read_text())
    federated = {t["name"]: t for t in report["quantization"]["tensors"]}
    centralized = {t["name"]: t for t in local["quantization"]["tensors"]}
    assert federated.keys() == centralized.keys() and federated
    for name, t in centralized.items():
        assert federated[name] == t, name
    assert (tmp_path / "local.onnx").read_bytes() == out.read_bytes(), "the same ranges give the same file"
    assert [p["state"] for p in report["phases"]] == ["done"] * len(report["phases"])
    sites = {s["worker"]: s for s in report["sites"]}
    assert sorted(sites) == names
    for s in sites.values():
        assert s["received"] and s["phasesServed"] == 4 and s["bytesUp"] > 0 and s["bytesDown"] > 0, s

    tx, ty = load_test_split()
    base, base_top1 = onnx_accuracy(MODEL, tx, ty)
    compressed, compressed_top1 = onnx_accuracy(out, tx, ty)
    print(f"\nint8 round: onnxruntime accuracy {base:.4f} -> {compressed:.4f} "
          f"(federated evaluation {report['before']['accuracy']:.4f} -> {report['after']['accuracy']:.4f}), "
          f"agreement {(base_top1 == compressed_top1).mean():.4f}, {report['before']['bytes']} -> {report['after']['bytes']} bytes")
    assert (base - compressed) * 100 <= INT8_LOSS_POINTS, (base, compressed)
    hx, hy = load_holdout_split()
    hold_base, _ = onnx_accuracy(MODEL, hx, hy)
    hold_compressed, _ = onnx_accuracy(out, hx, hy)
    print(f"int8 round on the {len(hy)} holdout images: {hold_base:.4f} -> {hold_compressed:.4f}")
    assert (hold_base - hold_compressed) * 100 <= INT8_LOSS_POINTS, (hold_base, hold_compressed)
    # The federated evaluation (each site on its held-out shard) equals onnxruntime on the union of those shards.
    ex = np.concatenate([np.load(fleet.workers[n]["eval_x"]) for n in names])
    ey = np.concatenate([np.load(fleet.workers[n]["eval_y"]) for n in names])
    assert report["before"]["samples"] == len(ey)
    assert abs(report["before"]["accuracy"] - onnx_accuracy(MODEL, ex, ey)[0]) < 1e-9
    assert abs(report["after"]["accuracy"] - onnx_accuracy(out, ex, ey)[0]) < 1e-9
    fleet.stop_workers()


def test_pruning_distillation_int8_round_shrinks_10x_and_holds_accuracy(coordinator_server, worker_path, tmp_path,
                                                                spawn_any):
    """50 % of channels pruned (L1 importance, every layer), federated distillation fine-tuning
    (half the workers have no labels), int8: at least 10x smaller, at most 1.5 points lost on the holdout images."""
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any)
    for k, name in enumerate(names):
        if k % 2 == 1:  # unlabeled boards take part through the teacher
            fleet.workers[name].pop("y")
        fleet.start_worker(name)
    started = fleet.round("start", "--model", MODEL, "--prune-ratio", "0.5", "--prune-scope", "local",
                          "--importance", "l1", "--finetune-rounds", ROUNDS, "--local-epochs", LOCAL_EPOCHS,
                          "--lr", "0.01", "--augment", "dihedral",
                          "--distill", "--quantize", "int8", "--calibration", "entropy", "--reduce-range", "--compact-names",
                          "--min-workers", "4", "--phase-deadline", "5m", "--json")
    round_id = json.loads(started.stdout)["id"]
    status = fleet.wait(round_id, timeout=900)
    assert status["state"] == "succeeded", status
    out, report_path = tmp_path / "round.onnx", tmp_path / "round.json"
    fleet.round("fetch", round_id, "--out", out, "--report", report_path)
    report = json.loads(report_path.read_text())
    tx, ty = load_test_split()
    base, _ = onnx_accuracy(MODEL, tx, ty)
    compressed, _ = onnx_accuracy(out, tx, ty)
    hx, hy = load_holdout_split()
    hold_base, _ = onnx_accuracy(MODEL, hx, hy)
    hold_compressed, _ = onnx_accuracy(out, hx, hy)
    lost = 100 * (hold_base - hold_compressed)
    shrink = MODEL.stat().st_size / out.stat().st_size
    timings = {p["label"]: round(p["endedAt"] - p["startedAt"], 1) for p in report["phases"]}
    print(f"\npruned int8 round: onnxruntime accuracy on the {len(hy)} holdout images {hold_base:.4f} -> "
          f"{hold_compressed:.4f} ({lost:.2f} points lost; on the {len(ty)} test images {base:.4f} -> {compressed:.4f}), "
          f"{shrink:.1f}x smaller, MACs {report['before']['macs']} -> {report['after']['macs']}; phases {timings}")
    assert lost <= PRUNED_INT8_GOAL_POINTS, (hold_base, hold_compressed)
    assert shrink >= PRUNED_SHRINK_FACTOR, shrink
    kinds = [p["kind"] for p in report["phases"]]
    assert kinds == ["prune"] + ["finetune"] * int(ROUNDS) + [
        "fold", "ranges", "histograms", "export", "evaluate", "distribute"]
    sites = {s["worker"]: s for s in report["sites"]}
    assert sorted(sites) == names and all(s["received"] for s in sites.values())
    fleet.stop_workers()


def test_kill_9_mid_round_loses_nothing_and_counts_nothing_twice(coordinator_server, worker_path, tmp_path,
                                                                  spawn_any):
    """The coordinator is killed with SIGKILL twice while a round runs (during fine-tuning and during the histogram
    pass) and restarted on the same address: the round finishes, every phase counted each worker exactly once, and
    the workers rode out the downtime."""
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, samples=250)
    for name in names:
        fleet.start_worker(name)
    started = fleet.round("start", "--model", MODEL, "--prune-ratio", "0.3", "--importance", "activation",
                          "--finetune-rounds", "4", "--local-epochs", "1", "--distill", "--quantize", "int8",
                          "--calibration", "percentile", "--min-workers", "4", "--phase-deadline", "5m", "--json")
    round_id = json.loads(started.stdout)["id"]
    kinds = [p["kind"] for p in json.loads(started.stdout)["phases"]]
    kill_at = [3, kinds.index("histograms")]
    server, port = fleet.server, fleet.server.port
    deadline = time.monotonic() + 600
    while kill_at:
        status = fleet.status(round_id)
        assert status["state"] == "running", status
        if status["phase"] >= kill_at[0]:
            kill_at.pop(0)
            server.kill()  # SIGKILL: no graceful anything
            time.sleep(1.5)
            server.start(listen=f"127.0.0.1:{port}")
        assert time.monotonic() < deadline, "the round did not reach the phases to interrupt"
        time.sleep(0.2)
    status = fleet.wait(round_id, timeout=600)
    assert status["state"] == "succeeded", status
    assert server.starts == 3
    worker_phases = [p for p in status["phases"] if p["kind"] not in ("prune", "fold", "export")]
    for p in worker_phases:
        assert p["reports"] == 4, p
    for site in status["sites"]:
        assert site["phasesServed"] == len(worker_phases), site
    out = tmp_path / "round.onnx"
    fleet.round("fetch", round_id, "--out", out)
    tx, ty = load_test_split()
    accuracy, _ = onnx_accuracy(out, tx, ty)
    assert accuracy > 0.5, accuracy
    fleet.stop_workers()


def test_continual_round_from_an_earlier_one_with_ewc_int8_deltas_and_qat(coordinator_server, worker_path,
                                                                       tmp_path, spawn_any):
    """A round re-tunes an earlier round's model (--from-round) with EWC (a federated Fisher phase first), int8
    deltas and a quantization-aware round after calibration. A bad plan is refused before anything starts."""
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, samples=120)
    for name in names:
        fleet.start_worker(name)
    first = json.loads(fleet.round("start", "--model", MODEL, "--finetune-rounds", "1", "--lr", "0.001",
                                   "--aggregation", "trimmed-mean", "--clip-norm", "5", "--quantize", "none",
                                   "--min-workers", "4", "--json").stdout)["id"]
    assert fleet.wait(first)["state"] == "succeeded"
    refused = fleet.round("start", "--from-round", first, "--ewc", "10", "--json", check=False)
    assert refused.returncode != 0 and "--finetune-rounds" in refused.stderr, refused.stderr
    second = json.loads(fleet.round("start", "--from-round", first, "--finetune-rounds", "2", "--lr", "0.001", "--ewc", "10",
                                    "--bn-passes", "2",
                                    "--distill", "--delta-compression", "int8", "--quantize", "int8",
                                    "--qat-rounds", "1", "--min-workers", "4", "--json").stdout)
    assert [p["kind"] for p in second["phases"]] == ["fisher", "finetune", "finetune", "normalization", "normalization",
                                                     "fold", "ranges", "qat", "export", "evaluate", "distribute"]
    status = fleet.wait(second["id"])
    assert status["state"] == "succeeded", status
    finetune = [p for p in status["phases"] if p["kind"] == "finetune"]
    fisher = [p for p in status["phases"] if p["kind"] == "fisher"][0]
    # int8 deltas: about a byte per parameter, against four for the float Fisher sums.
    assert all(p["bytesUp"] < 0.4 * fisher["bytesUp"] for p in finetune), (finetune, fisher)
    out = tmp_path / "second.onnx"
    fleet.round("fetch", second["id"], "--out", out)
    tx, ty = load_test_split()
    # Re-tuning on 120 samples per board keeps the fleet's model where it was (EWC towards it, distillation from it).
    accuracy = onnx_accuracy(out, tx, ty)[0]
    print(f"\ncontinual round: {accuracy:.4f}")
    assert accuracy >= CONTINUAL_MINIMUM_ACCURACY, accuracy
    listed = fleet.round("list").stdout
    assert first in listed and second["id"] in listed
    fleet.stop_workers()
