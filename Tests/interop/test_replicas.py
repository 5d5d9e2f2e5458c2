"""Coordinator replicas (issue 21): two `coordinator serve` processes made from one data directory, on one
PostgreSQL database (over verified TLS), behind HAProxy running deploy/haproxy.cfg as documented; eight real
workers; the replica holding the rounds' lease is killed with SIGKILL in the middle of a fine-tuning phase."""
import json
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import ROOT, CoordinatorServer
from rounds_support import MODEL, Fleet
from test_postgres import RECIPE, assert_same_model

WORKERS = 8
SAMPLES = 250
LEASE_SECONDS = 3
# The demo recipe with every worker in every phase: the model can then be compared with one coordinator's.
REPLICA_RECIPE = [*RECIPE[:RECIPE.index("--min-workers")], "--min-workers", str(WORKERS),
                  *RECIPE[RECIPE.index("--min-workers") + 2:]]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(port, backends):
    """deploy/haproxy.cfg with its listening address and its servers replaced, nothing else changed."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text, bound = re.subn(r"(?m)^    bind .*$", f"    bind 127.0.0.1:{port}", text)
    assert bound == 1
    lines = [line for line in text.splitlines() if not line.strip().startswith("server ")]
    lines += [f"    server replica-{k + 1} 127.0.0.1:{p}" for k, p in enumerate(backends)]
    return "\n".join(lines) + "\n"


def workers_on(server, worker_path, directory, spawn_any, url):
    """Eight workers enrolled through `url` with non-IID shards of the demo images."""
    server.url = url
    fleet = Fleet(server, worker_path, directory, spawn_any)
    return fleet, fleet.start_demo_workers(WORKERS, SAMPLES)


def run_round(fleet, during=None):
    started = json.loads(fleet.round("start", "--model", MODEL, *REPLICA_RECIPE, "--json").stdout)
    if during:
        during(started["id"])
    status = fleet.wait(started["id"], timeout=900)
    assert status["state"] == "succeeded", json.dumps(status)[:3000]
    for phase in status["phases"]:
        if phase["kind"] not in ("prune", "fold", "export"):
            assert phase["reports"] == WORKERS, phase
    return started["id"], status


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/install-deps installs it)")
def test_two_replicas_behind_haproxy_survive_kill_9_of_the_lease_holder(coordinator_server, coordinator_path, worker_path,
                                                                       tmp_path, spawn_any, postgres):
    url = postgres.database(tls=True)
    database = postgres.last
    balancer_port = free_port()
    balancer_url = f"https://127.0.0.1:{balancer_port}"

    # One data directory, copied: the replicas share the CA, server certificate and admin serial.
    first = coordinator_server("replica-a", start=False, database_url=url, heartbeat_seconds=1,
                               replica_lease_seconds=LEASE_SECONDS, url=balancer_url, replica_name="replica-a")
    first.cli("migrate", "--dir", first.dir)
    (first.dir / "whittle.sqlite").unlink()
    shutil.copytree(first.dir, tmp_path / "replica-b")
    second = CoordinatorServer(coordinator_path, tmp_path / "replica-b", tmp_path / "replica-b.log")
    second.configure(replica_name="replica-b")
    replicas = [first, second]
    names_of = {"replica-a": first, "replica-b": second}
    balancer = None
    try:
        for replica in replicas:
            replica.start()
        ports = [replica.port for replica in replicas]
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(balancer_port, ports))
        checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        balancer_log = open(tmp_path / "haproxy.log", "ab")
        balancer = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=balancer_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", balancer_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not listen"
                time.sleep(0.1)

        fleet, names = workers_on(first, worker_path, tmp_path / "fleet", spawn_any, balancer_url)
        killed = {}

        def kill_the_holder(round_id):
            """When the second fine-tuning phase opens, one worker that has not reported is paused (SIGSTOP), so the
            phase cannot close; once two reports are acknowledged, the replica holding the lease is killed; the
            worker resumes half a second later."""
            def phase_and_reporters():
                rows = postgres.psql(f"SELECT r.phase, r.state, coalesce(string_agg(rep.worker, ','), '') FROM round r "
                                     f"LEFT JOIN report rep ON rep.round = r.id AND rep.phase = r.phase "
                                     f"WHERE r.id = '{round_id}' GROUP BY r.phase, r.state", database=database)
                phase, state, reporters = rows[0]
                return int(phase), state, set(filter(None, reporters.split(",")))

            fine_tuning = [k for k, p in enumerate(json.loads(fleet.round("status", round_id, "--json").stdout)["phases"])
                           if p["kind"] == "finetune"]
            target = fine_tuning[1]
            deadline = time.monotonic() + 600
            while True:
                phase, state, reporters = phase_and_reporters()
                if phase == target:
                    break
                assert state == "running" and phase < target and time.monotonic() < deadline, (phase, state)
                time.sleep(0.02)
            paused = next(name for name in reversed(names) if name not in reporters)
            fleet.processes[paused].send_signal(signal.SIGSTOP)
            try:
                while len(phase_and_reporters()[2]) < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                holder = postgres.psql("SELECT holder FROM lease WHERE name = 'rounds'", database=database)[0][0]
                victim = names_of[holder]
                victim.kill()
                phase, _, reporters = phase_and_reporters()
                assert phase == target and paused not in reporters
                killed.update(replica=victim, holder=holder, phase=target, reports=len(reporters), at=time.time())
                time.sleep(0.5)
            finally:
                fleet.processes[paused].send_signal(signal.SIGCONT)

        round_id, status = run_round(fleet, during=kill_the_holder)
        survivor = next(r for r in replicas if r is not killed["replica"])
        holder = postgres.psql("SELECT holder FROM lease WHERE name = 'rounds'", database=database)[0][0]
        assert names_of[holder] is survivor, (holder, killed)
        assert "now closes phases and ends rounds" in survivor.log_path.read_text()
        # The phase open at the kill, with reports the dead replica had acknowledged, was closed by the survivor,
        # every worker counted once.
        cut = status["phases"][killed["phase"]]
        print(f"killed {killed['holder']} at phase {killed['phase']} with {killed['reports']} reports in; the phase closed "
              f"{cut['endedAt'] - killed['at']:.2f} s later with {cut['reports']}")
        assert cut["endedAt"] > killed["at"] and cut["reports"] == WORKERS, (cut, killed)
        counts = postgres.psql(f"SELECT count(DISTINCT (phase, worker)), count(*) FROM report WHERE round = '{round_id}'",
                               database=database)
        assert counts[0][0] == counts[0][1], "no report counted twice"
        replicated = tmp_path / "replicated.onnx"
        fleet.round("fetch", round_id, "--out", replicated)
        fleet.stop_workers()
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for replica in replicas:
            replica.kill()

    # The same fleet on one coordinator (the embedded SQLite database).
    alone = coordinator_server("alone", start=False, heartbeat_seconds=1)
    alone.start()
    fleet, _ = workers_on(alone, worker_path, tmp_path / "fleet-alone", spawn_any, alone.url)
    single_id, _ = run_round(fleet)
    single = tmp_path / "single.onnx"
    fleet.round("fetch", single_id, "--out", single)
    fleet.stop_workers()

    assert_same_model(single, replicated)
