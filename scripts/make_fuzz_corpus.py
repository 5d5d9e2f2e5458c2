#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (Sources/whittle-fuzz) into Tests/Fixtures/fuzz/TARGET/: the ONNX
fixtures and the hostile-model suite's models (onnx), valid and hostile .npy files (npy), and hand-encoded
protobuf messages for the coordinator and the worker, each prefixed by the selector byte the target dispatches
on. Run once by hand (python3 scripts/make_fuzz_corpus.py); the files are committed and small. scripts/fuzz
starts every run from them, and the Swift suites' normal build replays them (test_fuzz_corpus_replays).
"""
import hashlib
import pathlib
import struct
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "interop"))
from wire import pb_bytes, pb_varint  # noqa: E402
import hostile_models  # noqa: E402

OUT = ROOT / "Tests" / "Fixtures" / "fuzz"
MAX_FILE = 64 << 10


def write(target, data, limit=MAX_FILE):
    folder = OUT / target
    folder.mkdir(parents=True, exist_ok=True)
    if len(data) > limit:
        return
    (folder / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def pb_fixed32(field, value):
    return bytes([field << 3 | 5]) + struct.pack("<f", value)


def pb_double(field, value):
    return bytes([field << 3 | 1]) + struct.pack("<d", value)


def float_tensor(shape, values):
    """whittle.FloatTensor{shape=1 (packed int64), values=2 (packed float)}."""
    packed_shape = b"".join(_v(d) for d in shape)
    return pb_bytes(1, packed_shape) + pb_bytes(2, struct.pack(f"<{len(values)}f", *values))


def _v(n):
    from wire import _varint
    return _varint(n & ((1 << 64) - 1))


def map_entry(key, value_bytes):
    return pb_bytes(1, key) + pb_bytes(2, value_bytes)


def onnx_seeds():
    for path in sorted((ROOT / "Tests" / "Fixtures" / "models").glob("*.onnx")) + sorted((ROOT / "examples" / "models").glob("*.onnx")):
        write("onnx", path.read_bytes())
    for case in hostile_models.model_cases():
        if hasattr(case.model, "SerializeToString"):
            write("onnx", case.model.SerializeToString())
        elif isinstance(case.model, bytes):
            write("onnx", case.model)


def npy_seeds():
    import io
    for array in (np.zeros((2, 3), np.float32), np.arange(6, dtype=np.int64).reshape(3, 2), np.ones(4, np.uint8),
                  np.array(1.5, np.float64), np.zeros((1, 3, 4, 4), np.float32)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        write("npy", buffer.getvalue(), limit=4096)
    for case in hostile_models.npy_cases():
        if isinstance(case.input, bytes):
            write("npy", case.input, limit=4096)
    # .npz archives (the same target reads them): stored and deflated, as NumPy writes them.
    for compress in (np.savez, np.savez_compressed):
        buffer = io.BytesIO()
        compress(buffer, ids=np.arange(6, dtype=np.int64).reshape(2, 3), mask=np.ones((2, 3), np.bool_))
        write("npy", buffer.getvalue(), limit=4096)


def coordinator_seeds():
    # 0: EnrollRequest{protocol_version, token, csr_der}; the CSR a real worker sends.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "board-1")])).sign(key, hashes.SHA256())
    der = csr.public_bytes(serialization.Encoding.DER)
    write("coordinator", b"\x00" + pb_varint(1, 1) + pb_bytes(2, "ab" * 32) + pb_bytes(3, der))
    # 1: Heartbeat{protocol_version, capabilities{cores, memory, samples, labels, version}, working_on, wait_seconds}.
    caps = pb_varint(1, 2) + pb_varint(2, 1 << 30) + pb_varint(3, 500) + pb_varint(4, 1) + pb_bytes(5, "0.1")
    write("coordinator", b"\x01" + pb_varint(1, 1) + pb_bytes(2, caps) + pb_bytes(3, "r1/0") + pb_varint(4, 5))
    header = pb_varint(1, 1) + pb_bytes(2, "r20261206T000000Z-abcd") + pb_varint(3, 0) + pb_bytes(4, "upload-0001")
    # 2, 5, 8 (fedavg, trimmed mean, median): TaskReport with an update (WeightUpdate{deltas=1, compressed=2, samples=3, loss=4}).
    deltas = map_entry("w", float_tensor([4, 3], [0.01 * i for i in range(12)]))
    bias = map_entry("b", float_tensor([4], [0.1, -0.1, 0.2, 0.0]))
    update = pb_bytes(1, deltas) + pb_bytes(1, bias) + pb_varint(3, 10) + pb_double(4, 0.5)
    for selector in (2, 5, 8, 0x82):
        write("coordinator", bytes([selector]) + header + pb_bytes(12, update))
    # int8 deltas (QuantizedTensor{shape=1, scale=2, values=3}).
    quantized = pb_bytes(1, b"".join(_v(d) for d in [4, 3])) + pb_fixed32(2, 0.01) + pb_bytes(3, bytes(range(12)))
    update8 = pb_bytes(2, map_entry("w", quantized)) + pb_bytes(1, bias) + pb_varint(3, 10) + pb_double(4, 0.5)
    write("coordinator", b"\x02" + header + pb_bytes(12, update8))
    # importance: channels (ChannelStatistics) and gradient sums; calibration ranges and histograms; fisher; evaluation.
    channel = pb_bytes(1, struct.pack("<4d", 1, 2, 3, 4)) + pb_bytes(2, struct.pack("<4d", 1, 2, 3, 4)) \
        + pb_bytes(3, struct.pack("<4d", 1, 4, 9, 16)) + pb_bytes(4, b"".join(_v(0) for _ in range(4))) + pb_varint(5, 16)
    importance = pb_bytes(1, map_entry("a", channel)) + pb_bytes(2, map_entry("w", float_tensor([4, 3], [1.0] * 12))) + pb_varint(3, 10)
    write("coordinator", b"\x02" + header + pb_bytes(10, importance))
    range_stats = pb_fixed32(1, -1.0) + pb_fixed32(2, 2.0) + pb_varint(3, 100)
    calibration = pb_bytes(1, map_entry("a", range_stats)) + pb_bytes(1, map_entry("b", range_stats)) + pb_varint(3, 10)
    write("coordinator", b"\x02" + header + pb_bytes(11, calibration))
    histogram = pb_fixed32(1, 0.0) + pb_fixed32(2, 1.0) + pb_bytes(3, b"".join(_v(i) for i in range(16))) + pb_varint(4, 1)
    histograms = pb_bytes(2, map_entry("a", histogram)) + pb_varint(3, 10)
    write("coordinator", b"\x02" + header + pb_bytes(11, histograms))
    fisher = pb_bytes(1, map_entry("w", float_tensor([4, 3], [0.5] * 12))) + pb_varint(2, 10)
    write("coordinator", b"\x02" + header + pb_bytes(13, fisher))
    evaluation = pb_varint(1, 40) + pb_varint(2, 1) + pb_varint(3, 36) + pb_varint(4, 35) + pb_varint(5, 39) \
        + pb_double(6, 1.5) + pb_double(7, 1.0)
    write("coordinator", b"\x02" + header + pb_bytes(14, evaluation))
    write("coordinator", b"\x02" + header + pb_bytes(15, pb_bytes(1, "ab" * 32) + pb_varint(2, 1000)))


def worker_seeds():
    task = pb_bytes(1, "r20261206T000000Z-abcd") + pb_varint(2, 3) + pb_bytes(3, "finetune") + pb_bytes(4, "ab" * 32) \
        + pb_varint(5, 70000) + pb_bytes(6, "cd" * 32) + pb_varint(9, 2) + pb_fixed32(10, 0.01)
    write("worker", b"\x00" + pb_varint(1, 10) + pb_bytes(3, task) + pb_varint(4, 1))
    write("worker", b"\x00" + pb_varint(1, 10) + pb_bytes(3, pb_bytes(1, "../../etc/passwd") + pb_bytes(4, "ab" * 32)))
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Whittle coordinator CA")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(7) \
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365)) \
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256())
    der = cert.public_bytes(serialization.Encoding.DER)
    write("worker", b"\x01" + pb_bytes(1, "board-1") + pb_bytes(2, der) + pb_bytes(3, der))
    fisher = pb_bytes(1, map_entry("w", float_tensor([4, 3], [0.5] * 12)))
    write("worker", b"\x02" + fisher + pb_bytes(2, map_entry("w", float_tensor([4, 3], [1.0] * 12))))
    write("worker", b"\x03" + pb_varint(1, 1))


if __name__ == "__main__":
    # Generated seeds are named by their hash and replaced; inputs kept by name (regressions the fuzzer found,
    # such as onnx/crash-pad-missing-input) stay.
    for seed in OUT.glob("*/*"):
        if len(seed.name) == 16 and all(c in "0123456789abcdef" for c in seed.name):
            seed.unlink()
    onnx_seeds()
    npy_seeds()
    coordinator_seeds()
    worker_seeds()
    for target in sorted(p.name for p in OUT.iterdir()):
        files = list((OUT / target).iterdir())
        print(f"{target}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")
