"""The coordinator under the hostile loads of issue 15, measured on a real `coordinator serve` (release build):

1. Slow connections: N connections held open against the listener (a third plain TCP sending nothing, a third half a
   TLS ClientHello, a third a finished handshake and half a request head). While they are held: /healthz latency
   (p50, p99, max over 200 requests, a new TLS connection each) and a worker's round (evaluate and distribute the
   demo model) must complete; after idle_timeout_seconds every slow connection must have been closed.
2. Upload floods: W enrolled workers without a task each start a report upload declaring B bytes at once and send
   the body as fast as the coordinator takes it (the attack the issue measured at 61 → 1,307 MiB with four 200 MiB
   uploads). The coordinator's peak resident memory (VmHWM) is reported.

    swift build -c release --product coordinator --product worker
    python3 benchmarks/hardening.py [--connections 2000] [--uploads 16] [--upload-mib 200]

Prints the figures with the CPU they came from and writes benchmarks/last-hardening.json.
"""
import argparse
import json
import pathlib
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "interop"))
from conftest import CoordinatorServer, execute, launch  # noqa: E402
from rounds_support import MODEL, Fleet  # noqa: E402
from test_fleet import enrolled_identity  # noqa: E402

RELEASE = ROOT / ".build" / "release"


sys.path.insert(0, str(ROOT / "benchmarks"))
import machine  # noqa: E402


def peak_rss_mib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_slow_connections(server, count):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 512)), hard))
    sockets = []
    context = server.tls_context()
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", server.port))
        kind = i % 3
        if kind == 1:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        elif kind == 2:
            s = context.wrap_socket(s, server_hostname="127.0.0.1")
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sockets.append(s)
    return sockets


def closed_by_peer(sock):
    sock.settimeout(0.2)
    try:
        return sock.recv(1) == b""
    except (socket.timeout, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


def slow_connections(work, connections, idle):
    server = CoordinatorServer(RELEASE / "coordinator", work / "slow", work / "slow.log")
    server.init()
    server.configure(idle_timeout_seconds=idle, heartbeat_seconds=1)
    server.start()
    processes = []

    def spawn(*command, **kwargs):
        process = launch(command, **kwargs)
        processes.append(process)
        return process

    fleet = Fleet(server, RELEASE / "worker", work / "fleet", spawn)
    try:
        fleet.enroll(["board-0"])
        x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
        fleet.write_shard("board-0", x, (np.arange(64) % 4))
        fleet.start_worker("board-0")
        began = time.monotonic()
        sockets = open_slow_connections(server, connections)
        opened = time.monotonic() - began
        latencies = []
        for _ in range(200):
            t0 = time.monotonic()
            answer = server.request("GET", "/healthz", client_certificate=False)
            latencies.append((time.monotonic() - t0) * 1000)
            assert answer.status == 200, answer
        started = json.loads(fleet.round("start", "--model", MODEL, "--quantize", "none", "--phase-deadline", "2m", "--json").stdout)
        t0 = time.monotonic()
        ended = fleet.wait(started["id"], timeout=180)
        round_seconds = time.monotonic() - t0
        time.sleep(max(0.0, began + idle + 3 - time.monotonic()))
        still = sum(0 if closed_by_peer(s) else 1 for s in sockets)
        for s in sockets:
            s.close()
        latencies.sort()
        return {
            "connections": connections, "opened_seconds": round(opened, 1),
            "healthz_ms": {"p50": round(statistics.median(latencies), 2), "p99": round(latencies[int(0.99 * len(latencies)) - 1], 2),
                           "max": round(latencies[-1], 2)},
            "round": ended["state"], "round_seconds": round(round_seconds, 1),
            "held_after_idle_timeout": still, "idle_timeout_seconds": idle,
            "coordinator_rss_mib": round(rss_mib(server.process.pid), 1),
        }
    finally:
        for p in processes:
            p.terminate()
        server.stop(stop_timeout=30)


def concurrent_uploads(server, identities, size, chunk, timeout):
    """Every identity starts a report upload declaring `size` bytes at once and sends `chunk` repeatedly until the
    coordinator answers or closes; returns each upload's (status line, bytes sent) and the seconds it all took."""
    results = [None] * len(identities)

    def upload(i):
        cert, key = identities[i][0], identities[i][1]
        context = server.tls_context(cert, key)
        s = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="127.0.0.1")
        s.sendall(f"POST /v1/worker/reports HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                  f"Content-Length: {size}\r\n\r\n".encode())
        sent = 0
        s.settimeout(timeout)
        try:
            while sent < size:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        try:
            head = s.recv(200).split(b"\r\n")[0].decode(errors="replace")
        except OSError as error:
            head = f"closed ({error.__class__.__name__})"
        results[i] = (head, sent)
        s.close()

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(identities))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - t0


def upload_flood(work, uploads, mib):
    server = CoordinatorServer(RELEASE / "coordinator", work / "flood", work / "flood.log")
    server.init()
    server.configure(enroll_rate_per_second=100000.0, enroll_burst=1000)
    server.start()
    try:
        token = server.token(uses=uploads)["token"]
        identities = [enrolled_identity(server, token, f"w{i}", work) for i in range(uploads)]
        before = rss_mib(server.process.pid)
        results, seconds = concurrent_uploads(server, identities, mib << 20, b"\0" * (1 << 20), timeout=30)
        return {
            "uploads": uploads, "declared_mib_each": mib, "seconds": round(seconds, 1),
            "answers": sorted({r[0] for r in results}),
            "mib_sent_before_answer": round(sum(r[1] for r in results) / (1 << 20), 1),
            "coordinator_rss_before_mib": round(before, 1), "coordinator_peak_rss_mib": round(peak_rss_mib(server.process.pid), 1),
        }
    finally:
        server.stop(stop_timeout=30)


def big_model(path, width):
    """A classifier of about width² parameters (input [N, width] → Gemm width×width → Relu → Gemm width×4), so that a
    phase takes reports of twice its size: the uploads of a ResNet-50-size fleet."""
    from onnx import TensorProto, helper, numpy_helper, save
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((width, width), dtype=np.float32) * 0.01), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((4, width), dtype=np.float32) * 0.01), "w2")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h0"], transB=1), helper.make_node("Relu", ["h0"], ["h"]),
         helper.make_node("Gemm", ["h", "w2"], ["logits"], transB=1)], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w1, w2])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def upload_flood_with_tasks(work, uploads, mib):
    """`uploads` workers that each hold the fine-tuning task of a model large enough for `mib` MiB reports upload
    at once; the upload budget admits what fits, the rest wait (503 with Retry-After)."""
    from test_fleet import heartbeat_message
    from wire import pb_decode
    width = int(((mib << 20) / 2 / 4) ** 0.5) + 64
    model = work / "big.onnx"
    big_model(model, width)
    server = CoordinatorServer(RELEASE / "coordinator", work / "tasks", work / "tasks.log")
    server.init()
    server.configure(enroll_rate_per_second=100000.0, enroll_burst=1000, heartbeat_seconds=2)
    server.start()
    try:
        token = server.token(uses=uploads)["token"]
        identities = [enrolled_identity(server, token, f"w{i}", work) for i in range(uploads)]
        for cert, key, _, _ in identities:
            server.request("POST", "/v1/worker/heartbeat", body=heartbeat_message(samples=100),
                           headers={"Content-Type": "application/x-protobuf"}, certificate=cert, key=key)
        started = server.cli("round", "start", "--dir", server.dir, "--model", model, "--finetune-rounds", "1", "--distill",
                             "--quantize", "none", "--phase-deadline", "10m", "--json", timeout=600)
        assert started.returncode == 0, started.stderr
        holding = 0
        for cert, key, _, _ in identities:
            answer = server.request("POST", "/v1/worker/heartbeat", body=heartbeat_message(samples=100),
                                    headers={"Content-Type": "application/x-protobuf"}, certificate=cert, key=key, timeout=120)
            holding += 3 in pb_decode(answer.body)
        before = rss_mib(server.process.pid)
        chunk = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        results, seconds = concurrent_uploads(server, identities, mib << 20, chunk, timeout=60)
        answers = {}
        for head, _ in results:
            answers[head] = answers.get(head, 0) + 1
        return {
            "uploads": uploads, "workers_holding_the_task": holding, "declared_mib_each": mib,
            "model_mib": round(model.stat().st_size / (1 << 20), 1), "seconds": round(seconds, 1),
            "answers": answers, "coordinator_rss_before_mib": round(before, 1),
            "coordinator_peak_rss_mib": round(peak_rss_mib(server.process.pid), 1),
        }
    finally:
        server.stop(stop_timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=20, help="idle_timeout_seconds for the slow-connection run")
    parser.add_argument("--uploads", type=int, default=16)
    parser.add_argument("--upload-mib", type=int, default=200)
    args = parser.parse_args()
    print(machine.banner())
    out = {"machine": machine.describe(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        out["slow_connections"] = slow_connections(work, args.connections, args.idle)
        print(json.dumps(out["slow_connections"], indent=1))
        out["upload_flood"] = upload_flood(work, args.uploads, args.upload_mib)
        print(json.dumps(out["upload_flood"], indent=1))
        out["upload_flood_with_tasks"] = upload_flood_with_tasks(work, args.uploads, args.upload_mib)
        print(json.dumps(out["upload_flood_with_tasks"], indent=1))
    s, u = out["slow_connections"], out["upload_flood"]
    print(f"\n{machine.banner()}, {out['date']}")
    print(f"{s['connections']} slow connections: /healthz p50 {s['healthz_ms']['p50']} ms, p99 {s['healthz_ms']['p99']} ms, "
          f"max {s['healthz_ms']['max']} ms (goal: within 100 ms); a round {s['round']} in {s['round_seconds']} s; "
          f"{s['held_after_idle_timeout']} still held {s['idle_timeout_seconds']} s later")
    print(f"{u['uploads']} concurrent {u['declared_mib_each']} MiB uploads from workers without a task: answers {u['answers']}, "
          f"coordinator peak {u['coordinator_peak_rss_mib']} MiB (goal: under 512 MiB)")
    t = out["upload_flood_with_tasks"]
    print(f"{t['uploads']} concurrent {t['declared_mib_each']} MiB uploads from workers holding the task of a {t['model_mib']} MiB "
          f"model: answers {t['answers']}, coordinator {t['coordinator_rss_before_mib']} MiB before, peak "
          f"{t['coordinator_peak_rss_mib']} MiB (goal: under 512 MiB)")
    (ROOT / "benchmarks" / "last-hardening.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
