"""Hostile peers against the real binaries: a coordinator that sends a worker path-traversing identifiers, slow and
idle connections against `coordinator serve`, and byte ranges a client should not ask for. Every case is a real
process on loopback, bounded in time."""
import http.server
import os
import resource
import socket
import ssl
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import execute, launch
from wire import pb_bytes, pb_decode, pb_varint

SHA = "ab" * 32


def task_message(round_id, phase=0, kind="evaluate"):
    """whittle.Task{round_id=1, phase=2, kind=3, model_sha256=4, model_bytes=5}."""
    return pb_bytes(1, round_id) + pb_varint(2, phase) + pb_bytes(3, kind) + pb_bytes(4, SHA) + pb_varint(5, 1000)


class HostileCoordinator:
    """A TLS server holding the real coordinator's certificate and key (so an enrolled worker trusts it), answering
    every heartbeat with `task` and recording every request it receives."""

    def __init__(self, directory, port, task):
        self.requests = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(directory / "server.pem"), str(directory / "server.key"))
        context.load_verify_locations(str(directory / "ca.pem"))
        context.verify_mode = ssl.CERT_OPTIONAL
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(("POST", self.path, body))
                answer = pb_varint(1, 1) + pb_bytes(3, task) if self.path == "/v1/worker/heartbeat" else b""
                self.send_response(200 if self.path == "/v1/worker/heartbeat" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def do_GET(self):
                outer.requests.append(("GET", self.path, b""))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("round_id", ["../../victim/secret", "../../victim/secret\0ignored", "a/b", "..", "x" * 65, ""])
def test_worker_refuses_identifiers_that_could_name_a_file(coordinator_server, worker_path, tmp_path, round_id):
    """A coordinator that names a round `../../victim/secret` must not make the worker read, upload or delete the
    file `victim/secret-0.pb` beside the worker's folder (the pending-report path), nor any other file."""
    server = coordinator_server()
    token = server.token()
    wdir = tmp_path / "w" / "worker"
    result = execute([worker_path, "enroll", "--coordinator", server.url, f"--token={token['token']}",
                      "--ca-fingerprint", token["caFingerprint"], "--dir", wdir, "--name", "victim-board"])
    assert result.returncode == 0, result.stderr
    port = server.port
    server.stop()
    victim = tmp_path / "w" / "victim"
    victim.mkdir()
    secret = victim / "secret-0.pb"
    secret.write_bytes(b"the board's private file")
    before = secret.read_bytes()
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((4, 3, 32, 32), np.float32))
    with HostileCoordinator(server.dir, port, task_message(round_id)) as hostile:
        run = execute([worker_path, "run", "--dir", wdir, "--data", data, "--heartbeats", "3", "--log-format", "json"],
                      timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert secret.exists() and secret.read_bytes() == before, "the worker touched a file outside its folder"
    assert not any(path == "/v1/worker/reports" for _, path, _ in hostile.requests), hostile.requests
    assert not any(b"private file" in body for _, _, body in hostile.requests)
    assert not any(path.startswith("/v1/worker/artifacts") for _, path, _ in hostile.requests), \
        "a task with a malformed round id must be refused before anything is downloaded"
    assert "refused a task from the coordinator: the task's round id is malformed" in run.stderr, run.stderr[-2000:]
    assert not (wdir / "pending").exists() or not any((wdir / "pending").iterdir())


def raise_open_files(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def closed_by_peer(sock, timeout=0.2):
    """True when the server has closed `sock` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return True
    except (socket.timeout, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


def test_idle_and_slow_connections_are_closed_while_health_answers(coordinator_server):
    """Idle TCP connections, unfinished TLS handshakes and request heads that never end are held only for
    idle_timeout_seconds; meanwhile /healthz answers and the process keeps its descriptors."""
    idle = 3
    server = coordinator_server(idle_timeout_seconds=idle)
    count = 600
    assert raise_open_files(4 * count + 256) >= 3 * count + 64, "the test needs more file descriptors"
    sockets = []
    began = time.monotonic()
    for i in range(count):  # TCP only, nothing sent
        sockets.append(socket.create_connection(("127.0.0.1", server.port)))
    for i in range(count // 3):  # half a TLS ClientHello
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        sockets.append(s)
    context = server.tls_context()
    for i in range(count // 3):  # a finished handshake, then half a request head
        s = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="127.0.0.1")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sockets.append(s)
    opened = time.monotonic() - began
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        answer = server.request("GET", "/healthz", client_certificate=False)
        latencies.append(time.monotonic() - t0)
        assert answer.status == 200, answer
    print(f"{len(sockets)} slow connections opened in {opened:.1f} s; /healthz answered in "
          f"{1000 * min(latencies):.1f}-{1000 * max(latencies):.1f} ms")
    assert max(latencies) < 2.0, latencies
    time.sleep(max(0.0, began + idle + 2.5 - time.monotonic()))
    still_open = [s for s in sockets if not closed_by_peer(s)]
    for s in sockets:
        s.close()
    assert not still_open, f"{len(still_open)} of {len(sockets)} slow connections were still held after {idle} s idle"
    assert server.request("GET", "/healthz", client_certificate=False).status == 200


def test_inverted_and_malformed_ranges_are_refused(coordinator_server, tmp_path):
    """A byte range whose end precedes its start is not satisfiable (416), never answered as a partial body."""
    server = coordinator_server()
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(1000))
    answer = server.request("POST", "/admin/v1/artifacts", body=model.read_bytes(), client_certificate="admin",
                            headers={"Content-Type": "application/octet-stream"})
    assert answer.status == 200, answer
    sha = answer.json()["sha256"]
    # Artifacts are served to workers; the admin model route serves rounds' models. Use a worker identity.
    token = server.token()
    from test_fleet import enrolled_identity  # the hand-made enrollment helper
    certificate, key, _, _ = enrolled_identity(server, token["token"], "range-board", tmp_path)
    def ranged(spec):
        return server.request("GET", f"/v1/worker/artifacts/{sha}", headers={"Range": spec}, certificate=certificate, key=key)
    assert ranged("bytes=10-19").status == 206
    for spec in ("bytes=10-5", "bytes=2000-", "bytes=1000-1000"):
        answer = ranged(spec)
        assert answer.status == 416, (spec, answer)
        assert answer.headers.get("content-range") == "bytes */1000", (spec, answer)
    assert ranged("bytes=-5").status == 400


def test_a_forged_report_is_refused_and_the_coordinator_lives(coordinator_server, tmp_path):
    """A worker holding a fine-tuning task sends int8 deltas of shape [2^32, 2^32] (whose element count overflows
    when multiplied out), again and again: each is refused 422 naming the shape, the coordinator keeps serving, and
    the phase still takes the worker's honest report afterwards (nothing was counted)."""
    from test_fleet import enrolled_identity, heartbeat_message
    from rounds_support import MODEL
    server = coordinator_server(heartbeat_seconds=1)
    token = server.token()["token"]
    cert, key, _, _ = enrolled_identity(server, token, "forger", tmp_path)
    assert server.request("POST", "/v1/worker/heartbeat", body=heartbeat_message(samples=50),
                          headers={"Content-Type": "application/x-protobuf"}, certificate=cert, key=key).status == 200
    started = server.cli("round", "start", "--dir", server.dir, "--model", MODEL, "--finetune-rounds", "1", "--distill",
                         "--quantize", "none", "--phase-deadline", "2m", "--json")
    round_id = __import__("json").loads(started.stdout)["id"]
    task = None
    for _ in range(20):
        answer = server.request("POST", "/v1/worker/heartbeat", body=heartbeat_message(samples=50),
                                headers={"Content-Type": "application/x-protobuf"}, certificate=cert, key=key)
        fields = pb_decode(answer.body)
        if 3 in fields:
            task = pb_decode(fields[3][0])
            break
        time.sleep(0.5)
    assert task is not None and task[3] == [b"finetune"], task
    phase = task.get(2, [0])[0]
    quantized = pb_bytes(1, b"".join(_varint_bytes(d) for d in (1 << 32, 1 << 32))) + b"\x15" + b"\x00\x00\x80\x3f" \
        + pb_bytes(3, b"\x01\x02\x03\x04")
    update = pb_bytes(2, pb_bytes(1, "fc.weight") + pb_bytes(2, quantized)) + pb_varint(3, 1)
    for attempt in range(3):
        report = pb_varint(1, 1) + pb_bytes(2, round_id) + pb_varint(3, phase) + pb_bytes(4, f"forged-{attempt:04d}") \
            + pb_bytes(12, update)
        answer = server.request("POST", "/v1/worker/reports", body=report, headers={"Content-Type": "application/x-protobuf"},
                                certificate=cert, key=key)
        assert answer.status == 422, answer
        assert answer.json()["error"] == "invalid_report" and "shape" in answer.json()["message"], answer
        assert server.request("GET", "/healthz", client_certificate=False).status == 200
    assert server.running
    status = __import__("json").loads(server.cli("round", "status", round_id, "--dir", server.dir, "--json").stdout)
    assert status["state"] == "running" and status["phases"][0]["refused"] == 3, status


def _varint_bytes(n):
    from wire import _varint
    return _varint(n)


def test_a_heartbeat_naming_hostile_secure_rounds_is_refused(coordinator_server, tmp_path):
    """The rounds whose secure-aggregation secrets a worker says it holds (Capabilities.secure_rounds) are round ids:
    one that could name a file, or more than 16 of them, is refused 400 bad_capabilities and recorded nowhere."""
    from test_fleet import enrolled_identity, heartbeat_message
    server = coordinator_server(heartbeat_seconds=1)
    token = server.token()["token"]
    cert, key, _, _ = enrolled_identity(server, token, "boasting", tmp_path)
    plain = pb_decode(heartbeat_message(samples=50))
    capabilities = heartbeat_message(samples=50)[len(pb_varint(1, plain[1][0])):]  # field 2 with its tag and length

    def beat(rounds):
        extra = b"".join(pb_bytes(11, r) for r in rounds)
        inner = pb_decode(capabilities)[2][0] + extra
        return pb_varint(1, plain[1][0]) + pb_bytes(2, inner)

    for rounds in (["../../etc/passwd"], ["a/b"], [""], [f"r{k}" for k in range(17)]):
        answer = server.request("POST", "/v1/worker/heartbeat", body=beat(rounds),
                                headers={"Content-Type": "application/x-protobuf"}, certificate=cert, key=key)
        assert answer.status == 400 and answer.json()["error"] == "bad_capabilities", (rounds, answer)
    answer = server.request("POST", "/v1/worker/heartbeat", body=beat(["r20261207T000000-abcd1234"]),
                            headers={"Content-Type": "application/x-protobuf"}, certificate=cert, key=key)
    assert answer.status == 200, answer
    assert server.running
