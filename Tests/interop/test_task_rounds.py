"""Rounds of models that are not the demo classifier, with real coordinator and worker processes over mutual TLS: an
encoder whose boards hold token ids and attention masks in .npz files, and a segmenter whose boards hold per-pixel
labels; each report carries the task's own figures, per site and for the fleet."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from rounds_support import Fleet
from test_zoo import ZOO, relative_rmse, run_named, token_batch




def start_workers(fleet, names, data, labels=None):
    for k, name in enumerate(names):
        folder = fleet.dir / f"{name}-data"
        folder.mkdir(parents=True, exist_ok=True)
        files = {"x": data(k, folder)}
        if labels is not None and labels(k) is not None:
            files["y"] = folder / "y.npy"
            np.save(files["y"], labels(k))
        fleet.workers[name] = files
        fleet.start_worker(name)


def finished_report(fleet, tmp_path, *args):
    """Starts a round with `args`, waits for it to succeed, fetches its model and report: (model path, report)."""
    started = fleet.round("start", *args, "--phase-deadline", "2m", "--json")
    round_id = json.loads(started.stdout)["id"]
    status = fleet.wait(round_id, timeout=300)
    assert status["state"] == "succeeded", status
    out, report_path = tmp_path / "round.onnx", tmp_path / "round.json"
    fleet.round("fetch", round_id, "--out", out, "--report", report_path)
    return round_id, out, json.loads(report_path.read_text())


def test_an_encoder_round_runs_on_token_data_from_npz(coordinator_server, worker_path, tmp_path, spawn_any):
    """BERT-style encoder: activation importance, heads and FFN neurons pruned at 0.5, 3 rounds of label-free
    distillation, int8, on two boards holding `input_ids` and `attention_mask` in .npz files. The round succeeds, the
    result runs in onnxruntime with the same output shape, and the report counts MACs at the given sequence length."""
    source = ZOO / "bert_cls_op17.onnx"
    server = coordinator_server("coord", heartbeat_seconds=1)
    fleet = Fleet(server, worker_path, tmp_path, spawn_any)
    names = ["reader-0", "reader-1"]
    fleet.enroll(names)

    def data(k, folder):
        path = folder / "tokens.npz"
        np.savez(path, **token_batch(24, 10 + k))
        return path

    start_workers(fleet, names, data)
    refused = fleet.round("start", "--model", source, "--prune-ratio", "0.5", check=False)
    assert refused.returncode != 0 and "--shape input_ids" in refused.stderr, refused.stderr
    _, out, report = finished_report(fleet, tmp_path, "--model", source, "--shape", "input_ids=1x16", "--shape",
                                     "attention_mask=1x16", "--prune-ratio", "0.5", "--importance", "activation",
                                     "--finetune-rounds", "3", "--local-epochs", "2", "--optimizer", "adam", "--lr", "0.003",
                                     "--distill", "--quantize", "int8", "--min-workers", "2")
    test = token_batch(16, 2)
    expected = run_named(source, test)
    got = run_named(out, test)
    assert got.shape == expected.shape
    assert report["task"] == "classification" and report["after"]["macs"] * 1.3 <= report["before"]["macs"]
    sites = {s["worker"]: s for s in report["sites"]}
    assert sorted(sites) == names and all(s["received"] and s["agreement"] is not None for s in sites.values())
    print(f"\nencoder round: MACs {report['before']['macs']} -> {report['after']['macs']}, agreement "
          f"{report['agreement']:.3f}, top-1 agreement with the base on 16 new inputs in onnxruntime "
          f"{float((got.argmax(1) == expected.argmax(1)).mean()):.3f}")
    fleet.stop_workers()


def test_a_segmentation_round_reports_pixel_accuracy_and_mean_iou(coordinator_server, worker_path, tmp_path, spawn_any):
    """LR-ASPP quantized to int8 on three boards, two with per-pixel labels [N, H, W] and one without: every site row
    has its agreement and relative error, the labelled ones pixel accuracy and mean IoU before and after, and the
    fleet's figures are those of the labelled sites' pixels added up."""
    source = ZOO / "lraspp_op17.onnx"
    server = coordinator_server("coord", heartbeat_seconds=1)
    fleet = Fleet(server, worker_path, tmp_path, spawn_any)
    names = ["camera-0", "camera-1", "camera-2"]
    fleet.enroll(names)
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    images, pixels = {}, {}
    for k in range(3):
        x = np.random.default_rng(30 + k).standard_normal((8, 3, 64, 64)).astype(np.float32)
        classes = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
        noise = np.random.default_rng(40 + k).random(classes.shape) < 0.1
        images[k], pixels[k] = x, np.where(noise, (classes + 1) % 3, classes).astype(np.int64)

    def data(k, folder):
        path = folder / "x.npy"
        np.save(path, images[k])
        return path

    start_workers(fleet, names, data, labels=lambda k: pixels[k] if k < 2 else None)
    round_id, out, report = finished_report(fleet, tmp_path, "--model", source, "--quantize", "int8", "--min-workers", "3")
    assert report["task"] == "segmentation"
    sites = {s["worker"]: s for s in report["sites"]}
    for k, name in enumerate(names):
        site = sites[name]
        assert site["agreement"] is not None and site["relativeError"] is not None
        if k < 2:
            # The base model's pixel accuracy against labels that are its own classes with 10 % changed: about 90 %.
            assert 0.85 <= site["accuracyBefore"] <= 0.95 and site["meanIoUBefore"] is not None
            assert site["meanIoUAfter"] is not None and site["accuracyAfter"] is not None
        else:
            assert site.get("accuracyBefore") is None and site.get("meanIoUAfter") is None
    # The fleet's pixel accuracy is the labelled sites' correct pixels over their pixels (equal counts here).
    assert report["before"]["accuracy"] == pytest.approx((sites[names[0]]["accuracyBefore"] + sites[names[1]]["accuracyBefore"]) / 2)
    assert report["after"]["meanIoU"] is not None
    table = fleet.round("status", round_id).stdout
    assert "mIoU after" in table and "rel. error" in table, table
    # The quantized model's pixel agreement as onnxruntime measures it, against the report's.
    y = run_named(out, {"input": images[2]})
    base = run_named(source, {"input": images[2]})
    agreement = float((y.argmax(1) == base.argmax(1)).mean())
    assert abs(agreement - sites[names[2]]["agreement"]) <= 0.02, (agreement, sites[names[2]])
    print(f"\nsegmentation round: pixel accuracy {report['before']['accuracy']:.4f} -> {report['after']['accuracy']:.4f}, "
          f"mean IoU {report['before']['meanIoU']:.4f} -> {report['after']['meanIoU']:.4f}, "
          f"relative error {report['relativeError']:.4f}")
    fleet.stop_workers()
