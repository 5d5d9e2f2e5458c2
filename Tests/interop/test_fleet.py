"""The coordinator and its workers as real processes on loopback: `coordinator init/serve/token/workers` and
`worker enroll/run/status` over HTTPS with mutual TLS, plus hand-made requests (Python's ssl + http.client, protobuf
encoded by hand, certificates and CSRs made with `cryptography`) for what the binaries never send: foreign and
expired certificates, bad CSRs, malformed and oversized bodies, floods. Nothing is mocked."""
import datetime
import hashlib
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import threading
import time

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import execute, launch
from wire import _varint, pb_bytes, pb_decode, pb_varint

PROTOCOL_VERSION = 1
SECRET_FILES = ("ca.key", "server.key", "admin.key")


def enroll_request(token, csr_der, version=PROTOCOL_VERSION, extra=b""):
    """whittle.EnrollRequest{protocol_version=1, token=2, csr_der=3}."""
    return pb_varint(1, version) + pb_bytes(2, token) + pb_bytes(3, csr_der) + extra


def heartbeat_message(samples=3, version=PROTOCOL_VERSION, wait_seconds=0):
    """whittle.Heartbeat{protocol_version=1, capabilities=2{cores=1, memory_bytes=2, samples=3, labels=4, version=5},
    wait_seconds=4}."""
    capabilities = pb_varint(1, 2) + pb_varint(2, 1 << 30) + pb_varint(3, samples) + pb_varint(4, 0) + pb_bytes(5, "hand-made")
    return pb_varint(1, version) + pb_bytes(2, capabilities) + (pb_varint(4, wait_seconds) if wait_seconds else b"")


# ---- keys, CSRs and certificates ----------------------------------------------------------------------------------

def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(name, key):
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def with_bad_signature(csr_der):
    """The CSR with the last byte of its ECDSA signature (the end of the DER, inside s) flipped: still well-formed
    DER, but the signature no longer verifies."""
    broken = bytearray(csr_der)
    broken[-1] ^= 0x01
    assert x509.load_der_x509_csr(bytes(broken)).is_signature_valid is False
    return bytes(broken)


def issue(issuer_name, issuer_key, common_name, public_key, not_before, not_after, serial=None):
    """A client certificate shaped like the coordinator's own (CN, clientAuth, not a CA)."""
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Whittle"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(issuer_key, hashes.SHA256()))


def foreign_ca(subject):
    """A self-signed CA that is not the coordinator's (same subject name, other key)."""
    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate, key


def write_identity(directory, stem, certificate, key):
    """Writes STEM.pem and STEM.key; returns their paths."""
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def coordinator_ca(server):
    certificate = x509.load_pem_x509_certificate((server.dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((server.dir / "ca.key").read_bytes(), password=None)
    return certificate, key


def serial_hex(certificate):
    """The serial as the coordinator records it (certificateSerial): its unsigned big-endian bytes in hex."""
    n = certificate.serial_number
    return n.to_bytes((n.bit_length() + 7) // 8, "big").hex()


# ---- helpers ------------------------------------------------------------------------------------------------------

def assert_error(answer, status, code):
    """A refusal: the status, a JSON body {"error": code, "message": non-empty}."""
    assert answer.status == status, f"expected {status} {code}, got {answer}"
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    payload = answer.json()
    assert payload.get("error") == code, answer
    assert isinstance(payload.get("message"), str) and payload["message"], answer


def enroll_by_hand(server, token, name, key=None, csr=None, **kwargs):
    """POST /v1/enroll without a client certificate; returns the answer (and the key used)."""
    key = key or new_key()
    body = enroll_request(token, csr if csr is not None else make_csr(name, key), **kwargs)
    return server.request("POST", "/v1/enroll", body=body, headers={"Content-Type": "application/x-protobuf"}), key


def enrolled_identity(server, token, name, directory):
    """Enrolls `name` by hand and writes its certificate and key; returns (cert path, key path, certificate, key)."""
    answer, key = enroll_by_hand(server, token, name)
    assert answer.status == 200, answer
    fields = pb_decode(answer.body)
    assert fields[1] == [name.encode()]
    certificate = x509.load_der_x509_certificate(fields[2][0])
    assert fields[3][0] == x509.load_pem_x509_certificate((server.dir / "ca.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    cert_path, key_path = write_identity(directory, name, certificate, key)
    return cert_path, key_path, certificate, key


def heartbeat_by_hand(server, certificate=None, key=None, body=None, client_certificate=None, context=None):
    return server.request("POST", "/v1/worker/heartbeat", body=heartbeat_message() if body is None else body,
                          headers={"Content-Type": "application/x-protobuf"}, certificate=certificate, key=key,
                          client_certificate=client_certificate, context=context)


def expect_handshake_refusal(server, context):
    """A heartbeat attempt that must fail in TLS (an ssl error or a reset connection), never with an HTTP answer.
    Returns the exception and whether it happened in connect() (the handshake proper)."""
    connection = server.connection(context)
    stage = "connect"
    try:
        connection.connect()
        stage = "request"
        connection.request("POST", "/v1/worker/heartbeat", body=heartbeat_message(),
                           headers={"Content-Type": "application/x-protobuf", "Connection": "close"})
        response = connection.getresponse()
        body = response.read()
    except (ssl.SSLError, ConnectionError) as error:
        return error, stage
    finally:
        connection.close()
    pytest.fail(f"the TLS handshake should have been refused, but the server answered HTTP {response.status}: {body!r}")


def run(binary, *args, timeout=120, check=False):
    result = execute([binary, *args], timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{binary.name} {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


def worker_enroll(worker_path, server, token, directory, name, check=True, fingerprint=None):
    # `--token=T`, not `--token T`: a token may begin with '-' (see test_tokens_starting_with_a_dash_work_as_printed)
    return run(worker_path, "enroll", "--coordinator", server.url, f"--token={token['token']}",
               "--ca-fingerprint", fingerprint or token["caFingerprint"], "--dir", directory, "--name", name,
               check=check)


def worker_status(worker_path, directory):
    return json.loads(run(worker_path, "status", "--dir", directory, "--json", check=True).stdout)


def save_data(path, samples, labels=False):
    rng = np.random.default_rng(samples)
    np.save(path, rng.standard_normal((samples, 3, 8, 8)).astype(np.float32))
    if labels:
        label_path = path.with_name(path.stem + "_labels.npy")
        np.save(label_path, rng.integers(0, 4, samples).astype(np.int64))
        return path, label_path
    return path, None


def by_name(workers):
    return {w["name"]: w for w in workers}


@pytest.fixture
def spawn():
    """Starts a process (output piped, text) that is killed at teardown if a failed test left it running."""
    started = []

    def start(*command):
        process = launch(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture
def fleet(coordinator_server):
    """A coordinator with one-second heartbeats (so `worker run --heartbeats N` takes about N−1 seconds)."""
    def make(name="coord", **settings):
        return coordinator_server(name, **{"heartbeat_seconds": 1, **settings})
    return make


# ---- 1. the happy path --------------------------------------------------------------------------------------------

def test_init_serve_enroll_run_list(fleet, worker_path, tmp_path, spawn):
    server = fleet()
    for name in SECRET_FILES:
        mode = stat.S_IMODE(os.stat(server.dir / name).st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    assert stat.S_IMODE(os.stat(server.dir).st_mode) & 0o077 == 0, "the data directory is private"

    # init never overwrites a data directory with content
    before = {p.name: p.read_bytes() for p in server.dir.iterdir() if p.is_file() and p.name != "whittle.sqlite"}
    again = server.cli("init", "--dir", server.dir, check=False)
    assert again.returncode != 0
    assert "not empty" in again.stderr and "never overwrites" in again.stderr, again.stderr
    assert {p: (server.dir / p).read_bytes() for p in before} == before

    token = server.token(uses=2)
    assert set(token) == {"token", "expiresAt", "uses", "caFingerprint"} and token["uses"] == 2
    ca_der = x509.load_pem_x509_certificate((server.dir / "ca.pem").read_bytes()).public_bytes(serialization.Encoding.DER)
    assert token["caFingerprint"] == hashlib.sha256(ca_der).hexdigest()

    data = {"board-a": save_data(tmp_path / "a.npy", 7, labels=True), "board-b": save_data(tmp_path / "b.npy", 12)}
    for name in data:
        worker_enroll(worker_path, server, token, tmp_path / name, name)
        assert stat.S_IMODE(os.stat(tmp_path / name / "worker.key").st_mode) == 0o600
    enrolled = by_name(server.workers())
    assert sorted(enrolled) == ["board-a", "board-b"]
    assert all(w["state"] == "enrolled" and w.get("lastContactAt") is None for w in enrolled.values())

    runs = {}
    for name, (x, y) in data.items():
        args = ["run", "--dir", tmp_path / name, "--data", x, "--heartbeats", 2] + (["--labels", y] if y else [])
        runs[name] = spawn(worker_path, *args)
    for name, process in runs.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, f"worker run {name}: {out}{err}"
        assert f"worker '{name}'" in out

    workers = by_name(server.workers())
    assert sorted(workers) == ["board-a", "board-b"]
    for name, samples, labels in [("board-a", 7, True), ("board-b", 12, False)]:
        w = workers[name]
        assert w["state"] == "online", w
        assert w["address"] == "127.0.0.1", w
        assert w["capabilities"]["samples"] == samples, w
        assert w["capabilities"]["labels"] is labels, w
        assert w["capabilities"]["cores"] >= 1 and w["capabilities"]["memoryBytes"] > 0, w
        assert w.get("revokedAt") is None and w["lastContactAt"], w
        status = worker_status(worker_path, tmp_path / name)
        assert status["name"] == name and status["coordinator"] == server.url
        assert status["heartbeats"] == 2 and status["lastHeartbeatAt"], status
        assert status.get("lastError") is None, status
        assert status["certificateSerial"] == w["certificateSerial"]
        shown = json.loads(server.cli("workers", "show", name, "--dir", server.dir, "--json").stdout)
        assert shown["name"] == name and shown["certificateSerial"] == w["certificateSerial"]


def test_issued_serials_fit_in_20_octets(fleet, tmp_path):
    server = fleet()
    certificates = [x509.load_pem_x509_certificate((server.dir / f).read_bytes())
                    for f in ("ca.pem", "server.pem", "admin.pem")]
    token = server.token(uses=12)["token"]
    certificates += [enrolled_identity(server, token, f"w{i}", tmp_path)[2] for i in range(12)]
    # content octets of the DER INTEGER of a positive serial: bit_length // 8 + 1
    too_long = [(c.subject.rfc4514_string(), c.serial_number.bit_length() // 8 + 1) for c in certificates
                if c.serial_number.bit_length() // 8 + 1 > 20]
    assert too_long == [], f"serials longer than 20 octets (RFC 5280 4.1.2.2): {too_long}"


def test_tokens_are_hex_and_work_as_printed(fleet, worker_path, tmp_path):
    """Tokens are 256 random bits as 64 hex digits: nothing an argument parser or a shell reads specially (a base64url
    token could begin with '-', which `--token T` would take for an option)."""
    server = fleet()
    hint = server.cli("token", "create", "--dir", server.dir).stdout
    assert "--token <token>" in hint, hint
    tokens = []
    for _ in range(50):
        answer = server.request("POST", "/admin/v1/tokens", body=b'{"ttlSeconds": 600, "uses": 1}',
                                headers={"Content-Type": "application/json"}, client_certificate="admin")
        assert answer.status == 200, answer
        tokens.append(answer.json())
    assert all(re.fullmatch(r"[0-9a-f]{64}", t["token"]) for t in tokens), tokens
    assert len({t["token"] for t in tokens}) == len(tokens)
    token = tokens[-1]
    result = run(worker_path, "enroll", "--coordinator", server.url, "--token", token["token"],
                 "--ca-fingerprint", token["caFingerprint"], "--dir", tmp_path / "w", "--name", "spaced")
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()}"
    assert [w["name"] for w in server.workers()] == ["spaced"]


def key_exposures(trace, names, umask=0o022):
    """From an `strace -f -e trace=openat,rename,renameat,renameat2,chmod,fchmod` log: the files called one of
    `names` that appeared under their final name with group or other permission bits (before any later chmod),
    as {path: mode}."""
    pending, modes, fds, exposed = {}, {}, {}, {}

    def appeared(path, mode):
        if os.path.basename(path) in names and mode is not None and mode & 0o077:
            exposed.setdefault(path, oct(mode))

    for line in trace.splitlines():
        pid, _, call = line.partition(" ")
        call = call.strip()
        if call.endswith("<unfinished ...>"):
            pending[pid] = call[:-len("<unfinished ...>")].rstrip()
            continue
        resumed = re.match(r"<\.\.\. \w+ resumed>\s*(.*)", call)
        if resumed:
            call = pending.pop(pid, "") + resumed.group(1)
        if m := re.match(r'openat\(AT_FDCWD, "([^"]+)", ([A-Z_|]+), (0\d+)\) = (\d+)', call):
            path, flags, mode, fd = m.group(1), m.group(2), int(m.group(3), 8), m.group(4)
            fds[fd] = path
            if "O_CREAT" in flags and path not in modes:
                modes[path] = mode & ~umask
                appeared(path, modes[path])
        elif m := re.match(r'openat\(AT_FDCWD, "([^"]+)", [^)]*\) = (\d+)', call):
            fds[m.group(2)] = m.group(1)
        elif m := re.match(r'chmod\("([^"]+)", (0\d+)\) = 0', call):
            modes[m.group(1)] = int(m.group(2), 8)
        elif m := re.match(r"fchmod\((\d+), (0\d+)\) = 0", call):
            if m.group(1) in fds:
                modes[fds[m.group(1)]] = int(m.group(2), 8)
        elif m := re.match(r'(?:rename\("([^"]+)", "([^"]+)"\)|renameat2?\(AT_FDCWD, "([^"]+)", AT_FDCWD, "([^"]+)"[^)]*\)) = 0', call):
            source, target = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            modes[target] = modes.pop(source, None)
            appeared(target, modes[target])
    return exposed


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_key_files_are_never_readable_by_others(fleet, coordinator_path, worker_path, tmp_path):
    def traced(*command):
        log = tmp_path / "strace.log"
        result = subprocess.run(["strace", "-f", "-o", str(log), "-e",
                                 "trace=openat,rename,renameat,renameat2,chmod,fchmod", *map(str, command)],
                                capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o022))
        if result.returncode != 0 and "ptrace" in result.stderr:
            pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        return log.read_text()

    data = tmp_path / "prepared"  # an empty directory made beforehand, as packages and `install -d` do
    data.mkdir(mode=0o755)
    trace = traced(coordinator_path, "init", "--dir", data)
    assert "ca.key" in trace, "the trace shows the key files being written"
    exposed = key_exposures(trace, SECRET_FILES)
    server = fleet("serving")
    token = server.token()
    wdir = tmp_path / "board"
    wdir.mkdir(mode=0o755)
    trace = traced(worker_path, "enroll", "--coordinator", server.url, f"--token={token['token']}",
                   "--ca-fingerprint", token["caFingerprint"], "--dir", wdir, "--name", "w1")
    exposed.update(key_exposures(trace, ("worker.key",)))
    assert exposed == {}, f"key files that appeared with group/other permissions: {exposed}"


# ---- 2. health ----------------------------------------------------------------------------------------------------

def test_health_endpoints_answer_without_client_certificate_and_reveal_nothing(fleet, worker_path, tmp_path):
    server = fleet()
    worker_enroll(worker_path, server, server.token(), tmp_path / "w", "secret-board")
    for path, text in [("/healthz", b"ok\n"), ("/readyz", b"ready\n")]:
        answer = server.request("GET", path)
        assert answer.status == 200, answer
        assert answer.body == text, answer
        assert set(answer.headers) <= {"content-type", "content-length", "date", "server", "connection"}, answer
        assert not any(ch.isdigit() for ch in answer.headers.get("server", "")), f"no version in Server: {answer}"
    # the admin and worker routes say nothing without a certificate
    for method, path in [("GET", "/admin/v1/workers"), ("GET", "/admin/v1/workers/secret-board"),
                         ("POST", "/admin/v1/tokens"), ("POST", "/v1/worker/heartbeat")]:
        answer = server.request(method, path, body=b"" if method == "POST" else None)
        assert_error(answer, 401, "client_certificate_required")
        assert b"secret-board" not in answer.body


def test_idle_heartbeat_is_held_and_a_graceful_shutdown_answers_it(fleet, tmp_path):
    """Long polling: a heartbeat with wait_seconds is held while there is no task for the worker (at most one
    heartbeat interval, here 30 s); one without is answered at once; SIGTERM answers a held one at once, so a
    shutdown does not wait out the hold."""
    server = fleet(heartbeat_seconds=HOLD_SECONDS)
    cert, key, _, _ = enrolled_identity(server, server.token()["token"], "w1", tmp_path)
    began = time.monotonic()
    assert heartbeat_by_hand(server, cert, key).status == 200
    assert time.monotonic() - began < HOLD_SECONDS / 3, "a heartbeat without wait_seconds is not held"

    held = {}

    def poll():
        began = time.monotonic()
        held["answer"] = heartbeat_by_hand(server, cert, key, body=heartbeat_message(wait_seconds=HOLD_SECONDS))
        held["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(2)
    assert thread.is_alive(), "a heartbeat with wait_seconds and no task is held"
    took = server.stop()
    thread.join(HOLD_SECONDS)
    assert took < HOLD_SECONDS / 3 and held["seconds"] < HOLD_SECONDS / 2, (took, held)
    answer = held["answer"]
    assert answer.status == 200, answer
    fields = pb_decode(answer.body)
    assert fields[1] == [HOLD_SECONDS] and 3 not in fields, "the poll interval, and no task"


HOLD_SECONDS = 30


def test_a_hostile_wait_is_cut_to_the_heartbeat_interval(fleet, tmp_path):
    """wait_seconds at its largest (2^32 - 1) holds the heartbeat for the coordinator's interval (2 s here), no longer."""
    server = fleet(heartbeat_seconds=2)
    cert, key, _, _ = enrolled_identity(server, server.token()["token"], "w1", tmp_path)
    began = time.monotonic()
    answer = heartbeat_by_hand(server, cert, key, body=heartbeat_message(wait_seconds=2**32 - 1))
    took = time.monotonic() - began
    assert answer.status == 200 and pb_decode(answer.body)[1] == [2], answer
    assert 1.5 <= took < HOLD_SECONDS / 3, took


# ---- 3. refusals --------------------------------------------------------------------------------------------------

def test_heartbeat_without_client_certificate(fleet, tmp_path):
    server = fleet()
    enrolled_identity(server, server.token()["token"], "w1", tmp_path)
    assert_error(heartbeat_by_hand(server), 401, "client_certificate_required")
    (w,) = server.workers()
    assert w["state"] == "enrolled" and w.get("lastContactAt") is None and w.get("capabilities") is None


@pytest.mark.parametrize("tls", ["tls1.3", "tls1.2"])
def test_foreign_and_expired_certificates_are_refused_at_the_handshake(fleet, tmp_path, tls):
    """Twins of an enrolled worker's certificate (same serial, key and subject, so the application layer would
    accept them): one signed by the coordinator's CA and valid (accepted: the control), one signed by the
    coordinator's CA but expired, one signed by a foreign CA with the same name. The last two never reach HTTP."""
    maximum = ssl.TLSVersion.TLSv1_2 if tls == "tls1.2" else None
    server = fleet()
    token = server.token(uses=16)["token"]
    # `cryptography` issues serials of at most 159 bits (RFC 5280: 20 octets); about half of the coordinator's are
    # 160 bits (see test_issued_serials_fit_in_20_octets), so enroll until one can be twinned
    for i in range(16):
        _, _, issued, key = enrolled_identity(server, token, f"w{i}", tmp_path)
        if issued.serial_number.bit_length() < 160:
            break
    name = issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert by_name(server.workers())[name]["certificateSerial"] == serial_hex(issued)
    ca_certificate, ca_key = coordinator_ca(server)
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    valid = issue(ca_certificate.subject, ca_key, name, key.public_key(), now - day, now + day, issued.serial_number)
    paths = write_identity(tmp_path, "valid-twin", valid, key)
    assert heartbeat_by_hand(server, context=server.tls_context(*paths, maximum_version=maximum)).status == 200
    contact = by_name(server.workers())[name]["lastContactAt"]
    assert contact

    expired = issue(ca_certificate.subject, ca_key, name, key.public_key(), now - 3 * day, now - day, issued.serial_number)
    other_ca, other_key = foreign_ca(ca_certificate.subject)
    foreign = issue(other_ca.subject, other_key, name, key.public_key(), now - day, now + day, issued.serial_number)
    for stem, certificate in [("expired", expired), ("foreign", foreign)]:
        context = server.tls_context(*write_identity(tmp_path, stem, certificate, key), maximum_version=maximum)
        error, stage = expect_handshake_refusal(server, context)
        if tls == "tls1.2":  # the server's Finished never comes: the client's handshake itself fails
            assert stage == "connect" and isinstance(error, ssl.SSLError), (stem, stage, repr(error))
    time.sleep(1.1)  # a recorded contact would show a later second
    assert by_name(server.workers())[name]["lastContactAt"] == contact
    assert server.running


def test_revoked_worker_is_refused_without_restart(fleet, worker_path, tmp_path):
    server = fleet()
    pid = server.process.pid
    token = server.token()
    wdir = tmp_path / "w"
    worker_enroll(worker_path, server, token, wdir, "doomed")
    x, _ = save_data(tmp_path / "x.npy", 5)
    run(worker_path, "run", "--dir", wdir, "--data", x, "--heartbeats", 1, check=True)
    certificate, key = wdir / "worker.pem", wdir / "worker.key"
    assert heartbeat_by_hand(server, certificate, key).status == 200

    revoked = server.cli("workers", "revoke", "doomed", "--dir", server.dir, "--json")
    assert json.loads(revoked.stdout)["state"] == "revoked"
    assert_error(heartbeat_by_hand(server, certificate, key), 403, "revoked")

    began = time.monotonic()
    result = run(worker_path, "run", "--dir", wdir, "--data", x, "--heartbeats", 1, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - began < 30, "a refused worker stops at once, it does not retry"
    assert "refuses this worker" in result.stderr and "revoked" in result.stderr, result.stderr
    assert "revoked" in (worker_status(worker_path, wdir).get("lastError") or "")
    (w,) = server.workers()
    assert w["state"] == "revoked" and w["revokedAt"], w
    assert server.running and server.process.pid == pid and server.starts == 1
    # unknown names are 404 and revoke nothing
    missing = server.cli("workers", "revoke", "nobody", "--dir", server.dir, check=False)
    assert missing.returncode != 0 and "404" in missing.stderr, missing.stderr


def test_unknown_token(fleet):
    server = fleet()
    answer, _ = enroll_by_hand(server, "not-a-token", "w1")
    assert_error(answer, 401, "unknown_token")
    assert server.workers() == []


def test_expired_token(fleet):
    server = fleet()
    token = server.token(ttl="1s")
    time.sleep(2)
    answer, _ = enroll_by_hand(server, token["token"], "w1")
    assert_error(answer, 401, "expired_token")
    assert server.workers() == []


def test_exhausted_token(fleet):
    server = fleet()
    token = server.token(uses=1)["token"]
    assert enroll_by_hand(server, token, "w1")[0].status == 200
    answer, _ = enroll_by_hand(server, token, "w2")
    assert_error(answer, 401, "exhausted_token")
    assert [w["name"] for w in server.workers()] == ["w1"]


def test_reused_name_conflicts_and_uses_no_token(fleet):
    server = fleet()
    token = server.token(uses=2)["token"]
    assert enroll_by_hand(server, token, "dup")[0].status == 200
    serial = server.workers()[0]["certificateSerial"]
    answer, _ = enroll_by_hand(server, token, "dup")
    assert_error(answer, 409, "name_taken")
    assert [(w["name"], w["certificateSerial"]) for w in server.workers()] == [("dup", serial)]
    # the refusal took no use of the token: its second use is still there
    assert enroll_by_hand(server, token, "other")[0].status == 200
    assert sorted(w["name"] for w in server.workers()) == ["dup", "other"]


def test_csr_with_bad_signature(fleet):
    server = fleet()
    token = server.token(uses=1)["token"]
    key = new_key()
    answer, _ = enroll_by_hand(server, token, "w1", key=key, csr=with_bad_signature(make_csr("w1", key)))
    assert_error(answer, 400, "bad_csr")
    answer, _ = enroll_by_hand(server, token, "w1", csr=b"\x30\x03\x02\x01\x00")
    assert_error(answer, 400, "bad_csr")
    assert server.workers() == []
    assert enroll_by_hand(server, token, "w1")[0].status == 200, "a refused CSR takes no use of the token"


def test_bad_names_and_bad_admin_requests(fleet):
    server = fleet()
    token = server.token(uses=1)["token"]
    for name in ["bad name!", "whittle-admin", "ümlaut"]:  # not a worker name; the admin's name is reserved
        answer, _ = enroll_by_hand(server, token, name)
        assert_error(answer, 400, "bad_name")
    assert server.workers() == []
    admin = {"client_certificate": "admin", "headers": {"Content-Type": "application/json"}}
    for body in [b"{", b'{"uses": "many"}']:
        assert_error(server.request("POST", "/admin/v1/tokens", body=body, **admin), 400, "malformed_json")
    for body in [b'{"ttlSeconds": 0}', b'{"ttlSeconds": 1e9}', b'{"uses": 0}', b'{"uses": 100001}']:
        assert_error(server.request("POST", "/admin/v1/tokens", body=body, **admin), 400, "bad_token_request")
    assert_error(server.request("GET", "/admin/v1/workers/nobody", client_certificate="admin"), 404, "unknown_worker")
    assert_error(server.request("POST", "/admin/v1/workers/nobody/revoke", body=b"", client_certificate="admin"),
                 404, "unknown_worker")
    assert enroll_by_hand(server, token, "w1")[0].status == 200, "refusals took no use of the token"


def test_unsupported_protocol_version(fleet):
    server = fleet()
    token = server.token()["token"]
    answer, _ = enroll_by_hand(server, token, "w1", version=2)
    assert_error(answer, 400, "unsupported_protocol")
    assert server.workers() == []


def test_certificates_of_the_wrong_role(fleet, tmp_path):
    server = fleet()
    cert, key, _, _ = enrolled_identity(server, server.token()["token"], "w1", tmp_path)
    for method, path, body in [("GET", "/admin/v1/workers", None), ("GET", "/admin/v1/workers/w1", None),
                               ("POST", "/admin/v1/tokens", b"{}"), ("POST", "/admin/v1/workers/w1/revoke", b"")]:
        answer = server.request(method, path, body=body, certificate=cert, key=key,
                                headers={"Content-Type": "application/json"} if body else None)
        assert_error(answer, 403, "admin_certificate_required")
    assert_error(heartbeat_by_hand(server, client_certificate="admin"), 403, "worker_certificate_required")
    (w,) = server.workers()
    assert w["state"] == "enrolled" and w.get("revokedAt") is None and w.get("lastContactAt") is None, w


def padded_to(message, size):
    """`message` with an unknown length-delimited field 15 appended so that it is exactly `size` bytes long (parsers
    skip unknown fields, so the message stays valid)."""
    for length_bytes in (1, 2, 3, 4):
        n = size - len(message) - 1 - length_bytes  # a 1-byte tag, then the length
        if n >= 0 and len(_varint(n)) == length_bytes:
            padded = message + pb_bytes(15, b"\0" * n)
            assert len(padded) == size
            return padded
    raise ValueError(f"cannot pad to {size}")


def test_oversized_bodies(fleet, tmp_path):
    server = fleet()
    config = (server.dir / "coordinator.conf").read_text()
    enroll_limit, heartbeat_limit = 65536, 16384  # the defaults coordinator init writes
    assert f"enroll_body_limit = {enroll_limit}" in config and f"heartbeat_body_limit = {heartbeat_limit}" in config
    token = server.token(uses=2)["token"]
    protobuf = {"Content-Type": "application/x-protobuf"}

    # a valid request (good token, good CSR) padded one byte past the limit, then to exactly the limit
    too_big = padded_to(enroll_request(token, make_csr("w1", new_key())), enroll_limit + 1)
    assert_error(server.request("POST", "/v1/enroll", body=too_big, headers=protobuf), 413, "body_too_large")
    assert server.workers() == []
    just_fits = padded_to(enroll_request(token, make_csr("w1", new_key())), enroll_limit)
    assert server.request("POST", "/v1/enroll", body=just_fits, headers=protobuf).status == 200
    assert [w["name"] for w in server.workers()] == ["w1"]
    # the refused request took no use of the token: its second use is still there
    cert, key, _, _ = enrolled_identity(server, token, "w2", tmp_path)

    too_big = padded_to(heartbeat_message(), heartbeat_limit + 1)
    assert_error(heartbeat_by_hand(server, cert, key, body=too_big), 413, "body_too_large")
    assert by_name(server.workers())["w2"].get("lastContactAt") is None
    assert heartbeat_by_hand(server, cert, key, body=padded_to(heartbeat_message(), heartbeat_limit)).status == 200
    assert by_name(server.workers())["w2"]["state"] == "online"


def test_malformed_protobuf(fleet, tmp_path):
    server = fleet()
    token = server.token()["token"]
    for garbage in [b"\xff\xff\xff\xff", b"\x12\x40short", b"\x0a"]:
        answer = server.request("POST", "/v1/enroll", body=garbage, headers={"Content-Type": "application/x-protobuf"})
        assert_error(answer, 400, "malformed_message")
    assert server.workers() == []
    cert, key, _, _ = enrolled_identity(server, token, "w1", tmp_path)
    for garbage in [b"\xff\xff\xff\xff", b"\x12\x40short"]:
        assert_error(heartbeat_by_hand(server, cert, key, body=garbage), 400, "malformed_message")
    (w,) = server.workers()
    assert w.get("lastContactAt") is None and w.get("capabilities") is None, w


def test_wrong_fingerprint_on_worker_enroll(fleet, worker_path, tmp_path):
    server = fleet()
    token = server.token(uses=1)
    wrong = hashlib.sha256(b"someone else's CA").hexdigest()
    wdir = tmp_path / "w"
    result = worker_enroll(worker_path, server, token, wdir, "w1", check=False, fingerprint=wrong)
    assert result.returncode != 0
    assert "fingerprint" in result.stderr and wrong in result.stderr, result.stderr
    assert not wdir.exists() or not any(wdir.iterdir()), list(wdir.iterdir())
    assert server.workers() == []
    worker_enroll(worker_path, server, token, wdir, "w1")  # the token was never sent
    assert [w["name"] for w in server.workers()] == ["w1"]


# ---- 4. rate limiting ---------------------------------------------------------------------------------------------

def test_enroll_flood_is_rate_limited(fleet):
    server = fleet(enroll_burst=5, enroll_rate_per_second=1)
    key = new_key()
    body = enroll_request("garbage-token", make_csr("flood", key))
    began = time.monotonic()
    answers = [server.request("POST", "/v1/enroll", body=body, headers={"Content-Type": "application/x-protobuf"})
               for _ in range(20)]
    elapsed = time.monotonic() - began
    limited = [a for a in answers if a.status == 429]
    passed = [a for a in answers if a.status != 429]
    for a in passed:
        assert_error(a, 401, "unknown_token")
    # the burst, plus at most what one request per second refilled while the flood lasted
    assert 5 <= len(passed) <= 5 + int(elapsed) + 1, (elapsed, [a.status for a in answers])
    assert len(limited) >= 10, (elapsed, [a.status for a in answers])
    assert all(a.status == 401 for a in answers[:5]), "the burst passes"
    for a in limited:
        assert_error(a, 429, "rate_limited")
        assert a.headers.get("retry-after", "").isdigit() and int(a.headers["retry-after"]) >= 1, a
    assert server.request("GET", "/healthz").status == 200, "only enrollment is limited"
    time.sleep(int(limited[-1].headers["retry-after"]) + 0.1)
    answer, _ = enroll_by_hand(server, "garbage-token", "flood")
    assert_error(answer, 401, "unknown_token")
    assert server.workers() == []


# ---- 5. concurrency -----------------------------------------------------------------------------------------------

def test_fifty_workers_race_for_forty_uses(fleet, worker_path, tmp_path, spawn):
    server = fleet(enroll_burst=100, enroll_rate_per_second=100)
    token = server.token(uses=40)
    processes = {}
    for i in range(50):
        name = f"board-{i:02d}"
        processes[name] = spawn(worker_path, "enroll", "--coordinator", server.url, f"--token={token['token']}",
                                "--ca-fingerprint", token["caFingerprint"], "--dir", tmp_path / name, "--name", name)
    results = {name: (p.communicate(timeout=120), p.returncode) for name, p in processes.items()}
    succeeded = sorted(n for n, (_, rc) in results.items() if rc == 0)
    failed = {n: out_err for n, (out_err, rc) in results.items() if rc != 0}
    assert len(succeeded) == 40, {n: (results[n][1], err.strip()) for n, (_, err) in failed.items()}
    assert len(failed) == 10
    for name, (out, err) in failed.items():
        assert "exhausted" in err, f"{name}: {out}{err}"
        assert not (tmp_path / name).exists(), f"{name}: a refused enrollment writes nothing"
    assert sorted(w["name"] for w in server.workers()) == succeeded
    assert len({w["certificateSerial"] for w in server.workers()}) == 40


# ---- 6. durability and restarts -----------------------------------------------------------------------------------

def test_state_survives_restart_and_workers_ride_out_downtime(fleet, worker_path, tmp_path, spawn):
    server = fleet(heartbeat_seconds=2)
    port = server.port
    token = server.token(uses=3)
    for name in ["w1", "w2"]:
        worker_enroll(worker_path, server, token, tmp_path / name, name)
    x, _ = save_data(tmp_path / "x.npy", 9)
    run(worker_path, "run", "--dir", tmp_path / "w1", "--data", x, "--heartbeats", 1, check=True)
    before = server.workers()
    assert [w["name"] for w in before] == ["w1", "w2"]

    server.stop()
    server.start(listen=f"127.0.0.1:{port}")
    assert server.url == f"https://127.0.0.1:{port}"
    assert server.workers() == before, "workers, serials, contacts and capabilities are durable"
    # the token kept its one remaining use
    worker_enroll(worker_path, server, token, tmp_path / "w3", "w3")
    refused = worker_enroll(worker_path, server, token, tmp_path / "w4", "w4", check=False)
    assert refused.returncode != 0 and "exhausted" in refused.stderr, refused.stderr
    # an acknowledged enrollment survives a crash (SIGKILL, no shutdown at all)
    server.kill()
    server.start(listen=f"127.0.0.1:{port}")
    assert sorted(w["name"] for w in server.workers()) == ["w1", "w2", "w3"]

    # a worker started while the coordinator is down keeps retrying and finishes once it is back
    server.stop()
    began = time.monotonic()
    agent = spawn(worker_path, "run", "--dir", tmp_path / "w2", "--data", x, "--heartbeats", 3)
    time.sleep(3)
    assert agent.poll() is None, "the worker must not give up while the coordinator is down"
    server.start(listen=f"127.0.0.1:{port}")
    out, err = agent.communicate(timeout=90)
    assert agent.returncode == 0, f"{out}{err}"
    assert "unreachable" in err, err
    assert time.monotonic() - began < 90
    status = worker_status(worker_path, tmp_path / "w2")
    assert status["heartbeats"] == 3 and status.get("lastError") is None, status
    w2 = by_name(server.workers())["w2"]
    assert w2["state"] == "online" and w2["capabilities"]["samples"] == 9, w2

    # and a coordinator restarted in the middle of a run
    agent = spawn(worker_path, "run", "--dir", tmp_path / "w1", "--data", x, "--heartbeats", 3)
    deadline = time.monotonic() + 30
    while worker_status(worker_path, tmp_path / "w1")["heartbeats"] < 2:  # one from before, one from this run
        assert time.monotonic() < deadline and agent.poll() is None, "the run never sent its first heartbeat"
        time.sleep(0.1)
    server.stop()  # with the worker's kept-alive connection open: still graceful, within stop()'s 10 s
    time.sleep(1)
    server.start(listen=f"127.0.0.1:{port}")
    out, err = agent.communicate(timeout=90)
    assert agent.returncode == 0, f"{out}{err}"
    assert worker_status(worker_path, tmp_path / "w1")["heartbeats"] == 4
    assert sorted(w["name"] for w in server.workers()) == ["w1", "w2", "w3"]
    assert server.starts == 5


# ---- 7. admin from another host -----------------------------------------------------------------------------------

def test_admin_commands_from_another_host(fleet, worker_path, tmp_path):
    server = fleet()
    worker_enroll(worker_path, server, server.token(), tmp_path / "w", "w1")
    other = tmp_path / "laptop"
    other.mkdir()
    for name in ["admin.pem", "admin.key", "ca.pem", "coordinator.conf"]:
        shutil.copy2(server.dir / name, other / name)
    listed = server.cli("workers", "list", "--dir", other, "--server", server.url, "--json")
    assert json.loads(listed.stdout) == server.workers()
    table = server.cli("workers", "list", "--dir", other, "--server", server.url)
    assert "w1" in table.stdout
    token = json.loads(server.cli("token", "create", "--dir", other, "--server", server.url, "--json").stdout)
    worker_enroll(worker_path, server, token, tmp_path / "w2", "w2")
    assert sorted(w["name"] for w in server.workers()) == ["w1", "w2"]
    # the copy holds no CA key and needs none
    assert not (other / "ca.key").exists()


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_worker_binary_links_no_nio_or_hummingbird(worker_path, coordinator_path):
    """Boards run only outbound libcurl clients: the worker must not carry the server stack."""
    def symbols(path):
        return subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    worker_symbols = symbols(worker_path)
    assert "curl_easy_perform" in worker_symbols
    for module in ("NIOCore", "NIOPosix", "NIOSSL", "Hummingbird"):
        assert module not in worker_symbols, f"the worker links {module}"
    assert "Hummingbird" in symbols(coordinator_path)


def metric_samples(text):
    """Prometheus text exposition → {'name{labels}': value} (labels as printed)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_metrics_count_requests_enrollments_heartbeats_and_refused_reports(coordinator_server, tmp_path):
    server = coordinator_server("coord", start=False, heartbeat_seconds=1)
    # Settings from the environment and from --set override the file; JSON log lines.
    server.start(args=["--set", "metrics_token=scrape-secret", "--log-format", "json"], env={"WHITTLE_ENROLL_BURST": "3"})
    token = server.token(uses=1)["token"]
    cert, key, _, _ = enrolled_identity(server, token, "w1", tmp_path)
    assert enroll_by_hand(server, "no-such-token", "w2")[0].status == 401
    assert heartbeat_by_hand(server, cert, key).status == 200
    # A worker holding no task is refused before its body is read, whatever the body holds.
    refused = server.request("POST", "/v1/worker/reports", body=b"\xff\xff\xff", certificate=cert, key=key,
                             headers={"Content-Type": "application/x-protobuf"})
    assert_error(refused, 409, "stale_report")

    assert_error(server.request("GET", "/metrics"), 401, "metrics_unauthorized")
    assert_error(server.request("GET", "/metrics", headers={"Authorization": "Bearer wrong-secret!"}), 401, "bad_metrics_token")
    assert_error(server.request("GET", "/metrics", certificate=cert, key=key), 401, "metrics_unauthorized")
    by_token = server.request("GET", "/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert by_token.status == 200 and by_token.headers["content-type"].startswith("text/plain"), by_token
    by_admin = server.request("GET", "/metrics", client_certificate="admin")
    assert by_admin.status == 200, by_admin
    samples = metric_samples(by_admin.body.decode())
    expected = {
        'whittle_enrollments_total{result="enrolled"}': 1,
        'whittle_enrollments_total{result="unknown_token"}': 1,
        'whittle_heartbeats_total': 1,
        'whittle_reports_total{result="refused",reason="stale_report"}': 1,
        'whittle_workers{state="online"}': 1,
        'whittle_workers{state="revoked"}': 0,
        'whittle_rounds{state="running"}': 0,
        'whittle_http_requests_total{route="/v1/enroll",method="POST",status="200"}': 1,
        'whittle_http_requests_total{route="/v1/enroll",method="POST",status="401"}': 1,
        'whittle_http_requests_total{route="/v1/worker/heartbeat",method="POST",status="200"}': 1,
        'whittle_http_requests_total{route="/metrics",method="GET",status="401"}': 3,
    }
    for name, value in expected.items():
        assert samples.get(name) == value, (name, samples.get(name), sorted(samples))
    assert samples['whittle_http_request_duration_seconds_count{route="/v1/enroll"}'] == 2
    assert samples['whittle_http_received_bytes_total{route="/v1/enroll"}'] > 0

    server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    enrolled = [entry for entry in lines if entry["message"] == "enrolled"]
    assert enrolled and enrolled[0]["worker.name"] == "w1" and enrolled[0]["level"] == "info", lines
    assert all({"ts", "level", "logger", "message"} <= set(entry) for entry in lines)

    # A bad override stops serve with the variable's name and the reason.
    bad = execute([server.binary, "serve", "--dir", server.dir], timeout=30,
                  env={**os.environ, "WHITTLE_HEARTBEAT_SECONDS": "soon"})
    assert bad.returncode != 0 and "WHITTLE_HEARTBEAT_SECONDS: heartbeat_seconds must be a positive integer" in bad.stderr, bad
    bad = execute([server.binary, "serve", "--dir", server.dir, "--set", "no_such_key=1"], timeout=30)
    assert bad.returncode != 0 and "unknown setting 'no_such_key'" in bad.stderr, bad


def test_worker_settings_come_from_worker_conf_the_environment_and_flags(fleet, worker_path, tmp_path):
    """`worker enroll` writes a documented worker.conf; `worker run` reads it, WHITTLE_WORKER_* variables override
    it and flags override both; JSON log lines carry worker.name."""
    server = fleet()
    token = server.token()
    worker_enroll(worker_path, server, token, tmp_path / "w1", "w1")
    conf = tmp_path / "w1" / "worker.conf"
    template = conf.read_text()
    keys = re.findall(r"(?m)^# (\w+) =$", template)
    assert keys == ["data", "labels", "eval_data", "eval_labels", "memory_limit", "threads", "no_timing", "log_format",
                    "log_level"]
    x, y = save_data(tmp_path / "x.npy", 9, labels=True)
    conf.write_text(template + f"\ndata = {tmp_path / 'missing.npy'}\nthreads = 1\n")
    env = {**os.environ, "WHITTLE_WORKER_DATA": str(x), "WHITTLE_WORKER_LABELS": str(y), "WHITTLE_WORKER_LOG_FORMAT": "json"}
    result = execute([worker_path, "run", "--dir", tmp_path / "w1", "--heartbeats", 1], env=env, timeout=60)
    assert result.returncode == 0, result
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e["message"].startswith("worker 'w1' running") and e["worker.name"] == "w1" and e["samples"] == "9"
               for e in lines), result.stderr
    (w,) = server.workers()
    assert w["capabilities"]["samples"] == 9 and w["capabilities"]["labels"] is True, w
    # The kind of board: the kernels' instruction set and the threads from worker.conf; it can time models.
    assert w["capabilities"]["cpu"] and w["capabilities"]["threads"] == 1 and "noTiming" not in w["capabilities"], w
    # A flag beats the environment; a bad value names where it came from.
    bad = execute([worker_path, "run", "--dir", tmp_path / "w1", "--heartbeats", 1, "--data", tmp_path / "missing.npy"],
                  env=env, timeout=60)
    assert bad.returncode != 0 and "missing.npy" in bad.stderr, bad
    bad = execute([worker_path, "run", "--dir", tmp_path / "w1", "--heartbeats", 1],
                  env={**env, "WHITTLE_WORKER_THREADS": "many"}, timeout=60)
    assert bad.returncode != 0 and "WHITTLE_WORKER_THREADS: threads must be a positive integer" in bad.stderr, bad
    conf.write_text("memory_limit = lots\n")
    bad = execute([worker_path, "run", "--dir", tmp_path / "w1", "--heartbeats", 1, "--data", x], timeout=60)
    assert bad.returncode != 0 and "worker.conf: line 1: memory_limit 'lots' is not a size" in bad.stderr, bad
