"""The coordinator on PostgreSQL (issue 21): a real `coordinator serve` whose state lives in a PostgreSQL server
(scripts/postgres-cluster, reached over TLS with the server's certificate verified), real workers on loopback."""
import json
import time

import numpy as np

from rounds_support import MODEL, Fleet

# A round on PostgreSQL sums the same reports as on SQLite; only their arrival order (float addition) differs.
WEIGHT_TOLERANCE = 1e-5

RECIPE = ["--prune-ratio", "0.3", "--importance", "activation", "--finetune-rounds", "3", "--local-epochs", "1",
          "--distill", "--quantize", "int8", "--calibration", "percentile", "--min-workers", "4", "--phase-deadline", "5m"]


def fleet_on(coordinator_server, worker_path, directory, spawn_any, name, **settings):
    server = coordinator_server(name, start=False, heartbeat_seconds=1, **settings)
    if settings.get("database_url"):
        server.cli("migrate", "--dir", server.dir)
        # init made the embedded database before database_url was set: nothing may use it now.
        (server.dir / "whittle.sqlite").unlink()
    server.start()
    directory.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(server, worker_path, directory, spawn_any)
    return fleet, fleet.start_demo_workers(4, 250)


def initializers(path):
    import onnx
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def assert_same_model(first, second):
    """The two compressed models (ONNX files) hold the same tensors: float weights within WEIGHT_TOLERANCE of the
    largest magnitude, quantized tensors and zero points at most one step apart (where a float sum rounded
    differently)."""
    a, b = initializers(first), initializers(second)
    assert sorted(a) == sorted(b)
    for name in a:
        if a[name].dtype in (np.float32, np.float64):
            scale = max(float(np.abs(b[name]).max()), 1e-6)
            assert float(np.abs(a[name] - b[name]).max()) / scale <= WEIGHT_TOLERANCE, name
        else:
            assert int(np.abs(a[name].astype(np.int64) - b[name].astype(np.int64)).max()) <= 1, name


def test_a_round_on_postgresql_survives_kill_9_and_equals_the_round_on_sqlite(coordinator_server, worker_path, tmp_path,
                                                                               spawn_any, postgres):
    """The same round twice, on the embedded SQLite database and on PostgreSQL over verified TLS; the PostgreSQL
    coordinator is killed with SIGKILL during fine-tuning and restarted. Both rounds succeed with every worker counted
    once per phase, PostgreSQL holds the round's rows, and the two compressed models agree."""
    url = postgres.database(tls=True)
    models = {}
    for store in ("sqlite", "postgres"):
        settings = {"database_url": url} if store == "postgres" else {}
        fleet, names = fleet_on(coordinator_server, worker_path, tmp_path / store, spawn_any, f"coord-{store}", **settings)
        started = json.loads(fleet.round("start", "--model", MODEL, *RECIPE, "--json").stdout)
        round_id = started["id"]
        if store == "postgres":
            server, port = fleet.server, fleet.server.port
            deadline = time.monotonic() + 300
            while fleet.status(round_id)["phase"] < 3:
                assert time.monotonic() < deadline, "the round did not reach fine-tuning"
                time.sleep(0.2)
            server.kill()
            time.sleep(1.5)
            server.start(listen=f"127.0.0.1:{port}")
        status = fleet.wait(round_id, timeout=600)
        assert status["state"] == "succeeded", status
        for phase in status["phases"]:
            if phase["kind"] not in ("prune", "fold", "export"):
                assert phase["reports"] == 4, phase
        models[store] = tmp_path / f"{store}.onnx"
        fleet.round("fetch", round_id, "--out", models[store])
        fleet.stop_workers()
        if store == "postgres":
            # The state is in PostgreSQL, not in a file of the data directory.
            assert not (fleet.server.dir / "whittle.sqlite").exists()
            rows = postgres.psql(f"SELECT state FROM round WHERE id = '{round_id}'", database=postgres.last)
            assert rows == [("succeeded",)], rows
            reports = postgres.psql(f"SELECT count(DISTINCT (phase, worker)), count(*) FROM report WHERE round = '{round_id}'",
                                    database=postgres.last)
            assert reports[0][0] == reports[0][1], "no report counted twice"
            workers = postgres.psql("SELECT name FROM worker ORDER BY name", database=postgres.last)
            assert [w[0] for w in workers] == names
    assert_same_model(models["sqlite"], models["postgres"])


def test_serve_refuses_an_unmigrated_database_and_migrate_is_idempotent(coordinator_server, postgres):
    url = postgres.database(tls=False)
    server = coordinator_server("coord", start=False, database_url=url)
    refused = server.cli("serve", "--dir", server.dir, "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert refused.returncode != 0
    assert "schema version 0" in refused.stderr and "coordinator migrate" in refused.stderr, refused.stderr
    first = server.cli("migrate", "--dir", server.dir, "--json")
    assert json.loads(first.stdout)["from"] == "0"
    again = server.cli("migrate", "--dir", server.dir)
    assert "up to date" in again.stdout
    server.start()
    token = server.token(uses=2)
    assert postgres.psql("SELECT uses_allowed FROM token", database=postgres.last) == [("2",)]
    # A password in the URL never reaches the log or an error.
    wrong = server.cli("migrate", "--dir", server.dir, "--set",
                       f"database_url=postgresql://whittle_pw:secret-xyz-123@127.0.0.1:{postgres.port}/{postgres.last}?sslmode=disable",
                       check=False)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, wrong.stderr
    assert "secret-xyz-123" not in wrong.stderr and "secret-xyz-123" not in server.log()
    assert token["token"]
