"""Lifetimes: enrollment tokens listed and revoked, worker certificates renewed over mutual TLS (by themselves and on
request) across the expiry of the certificate they enrolled with, the server certificate replaced, dashboard
sessions kept across a restart, the CA rotated under a running fleet, and garbage collection of what no round needs.
Real processes on loopback."""
import json
import pathlib
import re
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from rounds_support import MODEL
from test_rounds import make_fleet


def test_tokens_are_listed_and_revoked(coordinator_server, worker_path, tmp_path):
    server = coordinator_server()
    first = server.token(uses=2)
    second = server.token()
    tokens = json.loads(server.cli("token", "list", "--dir", server.dir, "--json").stdout)
    assert [t["state"] for t in tokens] == ["active", "active"]
    assert all(first["token"] not in json.dumps(t) for t in tokens), "the secret is never shown again"
    ids = [t["id"] for t in tokens]
    # Revoke the first token by a prefix of its id (the table lists newest first).
    victim = ids[1]
    result = server.cli("token", "revoke", victim[:10], "--dir", server.dir)
    assert "revoked token" in result.stdout
    refused = server.cli("token", "revoke", "zz", "--dir", server.dir, check=False)
    assert refused.returncode != 0 and "hex digits" in refused.stderr
    unknown = server.cli("token", "revoke", "0123456789abcdef", "--dir", server.dir, check=False)
    assert unknown.returncode != 0 and "no token" in unknown.stderr

    def enroll(token, name):
        return subprocess_run([worker_path, "enroll", "--coordinator", server.url, f"--token={token['token']}",
                               "--ca-fingerprint", token["caFingerprint"], "--dir", tmp_path / name, "--name", name])

    revoked = enroll(first, "w1")
    assert revoked.returncode != 0 and "revoked" in revoked.stderr, revoked.stderr
    assert enroll(second, "w2").returncode == 0
    states = {t["id"]: t["state"] for t in json.loads(server.cli("token", "list", "--dir", server.dir, "--json").stdout)}
    assert states == {ids[1]: "revoked", ids[0]: "exhausted"}
    table = server.cli("token", "list", "--dir", server.dir).stdout
    assert "revoked" in table and "exhausted" in table and "2 of 2" in table


def subprocess_run(command):
    from conftest import execute
    return execute(command, timeout=60)


def serial_of(path):
    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


def test_the_fleet_runs_across_certificate_expiry(coordinator_server, worker_path, tmp_path, spawn_any):
    """Certificates of 40 seconds: the workers renew theirs when a third is left, again and again, over mutual
    TLS; well after the enrollment certificates have expired they are online and a round completes."""
    lifetime = 40.0
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, workers=2, samples=100,
                              worker_certificate_days=lifetime / 86400)
    enrolled = {name: serial_of(tmp_path / name / "worker.pem") for name in names}
    began = time.monotonic()
    for name in names:
        fleet.start_worker(name)
    time.sleep(max(0.0, began + 1.6 * lifetime - time.monotonic()))  # past the enrollment certificates' expiry
    workers = {w["name"]: w for w in json.loads(fleet.server.cli("workers", "list", "--dir", fleet.server.dir, "--json").stdout)}

    def renewals(name):
        return len(re.findall(rf"certificate renewed .*worker.name={name}\b", fleet.server.log_path.read_text(errors="replace")))

    for name in names:
        assert renewals(name) >= 2, fleet.server.log()
        assert workers[name]["state"] == "online", workers[name]
        current = serial_of(tmp_path / name / "worker.pem")
        assert current != enrolled[name] and workers[name]["certificateSerial"].lower().lstrip("0") == current.lstrip("0")
        assert not (tmp_path / name / "worker.pem.renewed").exists() and not (tmp_path / name / "worker.key.renewed").exists()
    # The fleet still works: a float round (evaluate, distribute) with both workers.
    started = fleet.round("start", "--model", MODEL, "--quantize", "none", "--min-workers", "2", "--phase-deadline", "2m", "--json")
    round_id = json.loads(started.stdout)["id"]
    ended = fleet.wait(round_id, timeout=180)
    assert ended["state"] == "succeeded", ended.get("message")


def test_dashboard_sessions_survive_a_restart(coordinator_server):
    server = coordinator_server()
    link = json.loads(server.cli("dashboard", "--dir", server.dir, "--json").stdout)["url"]
    path = link[len(server.url):]
    login = server.request("GET", path)
    assert login.status in (302, 303), login
    cookie = login.headers["set-cookie"].split(";")[0]
    assert server.request("GET", "/dashboard/api/workers", headers={"Cookie": cookie}).status == 200
    server.stop()
    server.start()
    assert server.request("GET", "/dashboard/api/workers", headers={"Cookie": cookie}).status == 200
    assert server.request("GET", "/dashboard/api/workers", headers={"Cookie": "whittle_session=" + "0" * 64}).status == 401


def test_garbage_collection_keeps_what_rounds_need(coordinator_server, worker_path, tmp_path, spawn_any):
    """With retention_days = 0, `coordinator gc` deletes the closed phases' report blobs and the intermediate models
    of a finished round, and keeps its base, float and final models (the latest succeeded round)."""
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, workers=2, samples=200, retention_days=0)
    for name in names:
        fleet.start_worker(name)
    started = fleet.round("start", "--model", MODEL, "--prune-ratio", "0.25", "--finetune-rounds", "2", "--local-epochs", "1",
                          "--quantize", "int8", "--min-workers", "2", "--max-accuracy-drop", "1", "--json")
    round_id = json.loads(started.stdout)["id"]
    ended = fleet.wait(round_id, timeout=300)
    assert ended["state"] == "succeeded", ended.get("message")
    artifacts = fleet.server.dir / "artifacts"
    reports = list((fleet.server.dir / "reports").rglob("*.pb"))
    models_before = {p.name for p in artifacts.iterdir()}
    assert len(reports) >= 2 * 4 and len(models_before) >= 5
    result = json.loads(fleet.server.cli("gc", "--dir", fleet.server.dir, "--json").stdout)
    assert result["reports"] == len(reports) and not list((fleet.server.dir / "reports").rglob("*.pb"))
    assert result["artifacts"] >= 2, result  # at least the two intermediate fine-tuned models
    kept = {p.name for p in artifacts.iterdir()}
    assert len(kept) == len(models_before) - result["artifacts"]
    # What the round's report and a continual round need is still there.
    out = tmp_path / "final.onnx"
    fleet.round("fetch", round_id, "--out", out)
    assert out.stat().st_size > 0
    again = json.loads(fleet.server.cli("gc", "--dir", fleet.server.dir, "--json").stdout)
    assert again == {"artifacts": 0, "artifactBytes": 0, "reports": 0, "reportBytes": 0}


def test_a_new_server_certificate_keeps_the_fleet(coordinator_server, worker_path, tmp_path, spawn_any):
    """`coordinator server-certificate` issues a new server certificate from the same CA; after a restart of serve
    the running workers reconnect (they trust the CA, not the certificate) and a round completes."""
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, workers=2, samples=100)
    for name in names:
        fleet.start_worker(name)
    server = fleet.server
    old = serial_of(server.dir / "server.pem")
    issued = json.loads(server.cli("server-certificate", "--dir", server.dir, "--hostname", "127.0.0.1", "localhost",
                                   "--json").stdout)
    assert serial_of(server.dir / "server.pem") != old and issued["serial"].lower().lstrip("0") == serial_of(server.dir / "server.pem").lstrip("0")
    port = server.port
    server.stop()
    server.start(listen=f"127.0.0.1:{port}")
    # An admin's `workers renew` makes a worker renew at its next heartbeat (a year-long certificate would not
    # renew by itself).
    enrolled = serial_of(tmp_path / names[0] / "worker.pem")
    other = serial_of(tmp_path / names[1] / "worker.pem")
    shown = fleet.server.cli("workers", "renew", names[0], "--dir", server.dir)
    assert "renews its certificate at its next heartbeat" in shown.stdout
    deadline = time.monotonic() + 15
    while serial_of(tmp_path / names[0] / "worker.pem") == enrolled and time.monotonic() < deadline:
        time.sleep(0.2)
    assert serial_of(tmp_path / names[0] / "worker.pem") != enrolled, server.log()
    assert serial_of(tmp_path / names[1] / "worker.pem") == other, "only the worker asked renews"
    assert server.cli("workers", "renew", "no-such-board", "--dir", server.dir, check=False).returncode != 0
    started = fleet.round("start", "--model", MODEL, "--quantize", "none", "--min-workers", "2", "--phase-deadline", "2m", "--json")
    ended = fleet.wait(json.loads(started.stdout)["id"], timeout=180)
    assert ended["state"] == "succeeded", ended.get("message")


def test_the_renewal_route_checks_the_csr_and_retires_the_old_certificate(coordinator_server, tmp_path):
    """POST /v1/worker/renew by hand: no client certificate, a malformed CSR and a CSR naming another worker are
    refused; a good one is answered with a certificate for the new key; the old certificate keeps working until the
    new one is presented, then it is refused."""
    from cryptography.hazmat.primitives import serialization
    from test_fleet import assert_error, enroll_request, enrolled_identity, heartbeat_by_hand, make_csr, new_key, write_identity
    from wire import pb_decode
    server = coordinator_server()
    token = server.token(uses=2)["token"]
    cert, key, certificate, _ = enrolled_identity(server, token, "board-a", tmp_path)
    enrolled_identity(server, token, "board-b", tmp_path)

    def renew(body, **identity):
        return server.request("POST", "/v1/worker/renew", body=body, headers={"Content-Type": "application/x-protobuf"}, **identity)

    fresh = new_key()
    assert_error(renew(enroll_request("", make_csr("board-a", fresh))), 401, "client_certificate_required")
    assert_error(renew(enroll_request("", b"not a csr"), certificate=cert, key=key), 400, "bad_csr")
    assert_error(renew(enroll_request("", make_csr("board-b", fresh)), certificate=cert, key=key), 400, "bad_name")
    answer = renew(enroll_request("", make_csr("board-a", fresh)), certificate=cert, key=key)
    assert answer.status == 200, answer
    fields = pb_decode(answer.body)
    renewed = x509.load_der_x509_certificate(fields[2][0])
    assert fields[1] == [b"board-a"] and renewed.serial_number != certificate.serial_number
    assert renewed.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        fresh.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    new_cert, new_key_path = write_identity(tmp_path, "board-a-renewed", renewed, fresh)
    assert heartbeat_by_hand(server, cert, key).status == 200, "the old certificate works until the new one is used"
    assert heartbeat_by_hand(server, new_cert, new_key_path).status == 200
    assert_error(heartbeat_by_hand(server, cert, key), 403, "worker_certificate_required")
    assert heartbeat_by_hand(server, new_cert, new_key_path).status == 200


def certificates_in(path):
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_a_ca_rotation_keeps_the_fleet(coordinator_server, worker_path, tmp_path, spawn_any):
    """`coordinator ca begin` and a restart: the running workers renew from the next CA and trust both; a board
    enrolled during the rotation pins the current CA and gets a certificate from the next one. `ca finish` is refused
    while a board kept offline still holds a certificate from the old CA, and goes through once it is revoked. After
    a restart only the new CA is trusted: the workers renew once more and drop the old CA, a certificate from the old
    CA is refused at the handshake, admin commands work with the new admin certificate, and a round completes."""
    import ssl
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, workers=3, samples=100)
    offline = names[2]
    for name in names[:2]:
        fleet.start_worker(name)
    server = fleet.server
    old_ca = certificates_in(server.dir / "ca.pem")
    status = json.loads(server.cli("ca", "status", "--dir", server.dir, "--json").stdout)
    assert "next" not in status or status["next"] is None
    begun = json.loads(server.cli("ca", "begin", "--dir", server.dir, "--json").stdout)
    refused = server.cli("ca", "begin", "--dir", server.dir, check=False)
    assert refused.returncode != 0 and "already under way" in refused.stderr
    next_ca = certificates_in(server.dir / "ca-next.pem")
    assert begun["fingerprint"] == next_ca[0].fingerprint(hashes.SHA256()).hex()
    port = server.port
    server.stop()
    server.start(listen=f"127.0.0.1:{port}")

    def issued_by(name, ca):
        return certificates_in(tmp_path / name / "worker.pem")[0].issuer == ca[0].subject

    def wait_for(condition, what, timeout=20):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}:\n{server.log()}\n{fleet.worker_log(names[0])}"
            time.sleep(0.2)

    for name in names[:2]:
        wait_for(lambda: issued_by(name, next_ca) and len(certificates_in(tmp_path / name / "ca.pem")) == 2,
                 f"{name} did not renew from the next CA")
    # A board enrolled now pins the current CA (the server certificate is still its) and trusts both at once.
    token = server.token()
    assert token["caFingerprint"] == old_ca[0].fingerprint(hashes.SHA256()).hex()
    fleet.enroll(["late-board"])
    assert issued_by("late-board", next_ca) and len(certificates_in(tmp_path / "late-board" / "ca.pem")) == 2
    status = json.loads(server.cli("ca", "status", "--dir", server.dir, "--json").stdout)
    assert status["renewed"] == sorted([*names[:2], "late-board"]) and status["pending"] == [offline], status
    shown = server.cli("ca", "status", "--dir", server.dir).stdout
    assert "rotation under way" in shown and offline in shown

    # The offline board would be cut off: finish refuses, naming it.
    blocked = server.cli("ca", "finish", "--dir", server.dir, check=False)
    assert blocked.returncode != 0 and offline in blocked.stderr and "--force" in blocked.stderr, blocked.stderr
    assert (server.dir / "ca-next.pem").exists()
    server.cli("workers", "revoke", offline, "--dir", server.dir)
    finished = json.loads(server.cli("ca", "finish", "--dir", server.dir, "--json").stdout)
    assert finished["caFingerprint"] == begun["fingerprint"] and finished["abandoned"] == []
    assert certificates_in(server.dir / "ca.pem") == next_ca and not (server.dir / "ca-next.pem").exists()
    assert certificates_in(pathlib.Path(finished["retiredCertificate"])) == old_ca
    server.stop()
    server.start(listen=f"127.0.0.1:{port}")

    # The running workers renew once more and trust the new CA alone.
    for name in names[:2]:
        wait_for(lambda: certificates_in(tmp_path / name / "ca.pem") == next_ca, f"{name} still trusts the old CA")
    # A certificate from the old CA (the offline board's) is refused at the handshake.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        server.request("GET", "/v1/worker/artifacts/" + "0" * 64, certificate=tmp_path / offline / "worker.pem",
                       key=tmp_path / offline / "worker.key")
    states = {w["name"]: w["state"] for w in server.workers()}  # the new admin certificate works
    assert states[names[0]] == "online" and states[names[1]] == "online" and states[offline] == "revoked", states
    started = fleet.round("start", "--model", MODEL, "--quantize", "none", "--min-workers", "2", "--phase-deadline", "2m", "--json")
    ended = fleet.wait(json.loads(started.stdout)["id"], timeout=180)
    assert ended["state"] == "succeeded", ended.get("message")
