"""Coordinator replicas on PostgreSQL (issue 21): what the shared database costs per report, and heartbeats from a
fleet of 10,000 simulated boards against two replicas.

Starts a throwaway PostgreSQL cluster (scripts/postgres-cluster: initdb in a temporary directory, fsync on, TLS
available, loopback), then:
  1. the same round (benchmarks/rounds.py's scenario A: 8 real workers, 50 % Taylor pruning, 3 fine-tuning rounds,
     int8 entropy) on one coordinator with the embedded SQLite database and on one with PostgreSQL: coordinator CPU
     per report on each, and the PostgreSQL server's own CPU;
  2. two `coordinator serve` replicas made from one data directory on one PostgreSQL database; `whittle-loadgen`
     enrolls --fleet simulated boards (alternately through each replica, with one token) and has each heartbeat over
     its own kept-alive mutual-TLS connection every --period seconds, spread over the period: after one unmeasured
     cycle in which every board opens its connection (reported apart), --seconds of heartbeats/s, p50 and p99
     latency and errors, and the CPU (enrollment included) and peak memory of each replica and of PostgreSQL.

    swift build -c release --product coordinator --product worker --product whittle-loadgen
    python3 benchmarks/replicas.py [--fleet 10000] [--period 10] [--seconds 60] [--skip-rounds]

Prints tables and writes benchmarks/last-replicas.json. Everything (boards, replicas, database) shares this machine's
cores, so the figures are a floor for a deployment with a machine per replica.
"""
import argparse
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402
import rounds  # noqa: E402
from heartbeats import token  # noqa: E402

RELEASE = ROOT / ".build" / "release"
PER_LOADGEN = 5000


class Cluster:
    def __init__(self, directory):
        self.dir = pathlib.Path(directory)
        out = subprocess.run(["bash", ROOT / "scripts" / "postgres-cluster", "start", self.dir], check=True,
                             capture_output=True, text=True, timeout=180).stdout
        fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        self.port, self.socket = int(fields["port"]), fields["socket"]
        self.postmaster = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        self.count = 0

    def database(self):
        self.count += 1
        name = f"bench{self.count}"
        subprocess.run(["psql", "-h", self.socket, "-p", str(self.port), "-U", "whittle", "-d", "postgres", "-qc",
                        f"CREATE DATABASE {name}"], check=True, capture_output=True)
        return f"postgresql://whittle@127.0.0.1:{self.port}/{name}?sslmode=disable"

    def cpu_seconds(self):
        """The server's CPU so far: the postmaster, its reaped children (backends that ended) and its live ones."""
        fields = pathlib.Path(f"/proc/{self.postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(int(f) for f in fields[11:15]) / 100.0  # utime, stime, cutime, cstime
        for child in subprocess.run(["pgrep", "-P", str(self.postmaster)], capture_output=True, text=True).stdout.split():
            try:
                total += rounds.cpu_seconds(int(child))
            except (OSError, IndexError):
                pass
        return total

    def stop(self):
        subprocess.run(["bash", ROOT / "scripts" / "postgres-cluster", "stop", self.dir], capture_output=True, timeout=120)


def compare_stores(cluster, tmp):
    pruned = ["--prune-ratio", "0.5", "--prune-scope", "local", "--importance", "taylor", "--finetune-rounds", "3",
              "--local-epochs", "1", "--lr", "0.005", "--distill", "--quantize", "int8", "--calibration", "entropy",
              "--reduce-range", "--compact-names"]
    out = {}
    for store in ("sqlite", "postgres"):
        folder = pathlib.Path(tmp) / f"rounds-{store}"
        folder.mkdir()
        settings = {"database_url": cluster.database()} if store == "postgres" else {}
        print(f"== round A on {store}", flush=True)
        r = rounds.run(f"A-{store}", 8, 500, pruned, folder, settings=settings,
                       database_cpu=cluster.cpu_seconds if store == "postgres" else None)
        out[store] = r
        database = f"; PostgreSQL server {1000 * r['databaseCPUSeconds'] / r['reports']:.1f} ms/report" if r["databaseCPUSeconds"] else ""
        print(f"  wall {r['wallSeconds']:.1f} s; coordinator CPU {r['coordinatorCPUSeconds']:.2f} s over {r['reports']} reports = "
              f"{r['coordinatorCPUPerReportMs']:.1f} ms/report{database}; peak RSS {r['coordinatorPeakRSSMiB']:.0f} MiB", flush=True)
    ratio = out["postgres"]["coordinatorCPUPerReportMs"] / out["sqlite"]["coordinatorCPUPerReportMs"]
    print(f"coordinator CPU per report, PostgreSQL / SQLite: {ratio:.2f}x (goal at most 1.5x)")
    return {"sqlite": out["sqlite"], "postgres": out["postgres"], "ratio": ratio}


def rss_peak_mib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def heartbeats(cluster, tmp, fleet, period, seconds):
    first = pathlib.Path(tmp) / "replica-a"
    subprocess.run([RELEASE / "coordinator", "init", "--dir", first, "--listen", "127.0.0.1:0",
                    "--database-url", cluster.database()], check=True, capture_output=True)
    conf = first / "coordinator.conf"
    text = conf.read_text()
    for key, value in {"enroll_rate_per_second": "100000.0", "enroll_burst": "100000", "max_connections": str(fleet),
                       "heartbeat_seconds": str(int(period))}.items():
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines()) + "\n"
    conf.write_text(text)
    (first / "whittle.sqlite").unlink(missing_ok=True)
    second = pathlib.Path(tmp) / "replica-b"
    shutil.copytree(first, second)
    processes, urls = [], []
    try:
        for k, directory in enumerate((first, second)):
            log = open(pathlib.Path(tmp) / f"replica-{k}.log", "ab")
            processes.append(subprocess.Popen([RELEASE / "coordinator", "serve", "--dir", directory, "--set", f"replica_name=replica-{k}"],
                                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LOG_LEVEL": "warning"}))
        for directory, process in zip((first, second), processes):
            listening = directory / "listening"
            for _ in range(600):
                if listening.exists() or process.poll() is not None:
                    break
                time.sleep(0.05)
            urls.append(listening.read_text().strip())
        cpu0 = [rounds.cpu_seconds(p.pid) for p in processes]
        database0 = cluster.cpu_seconds()
        # libcurl holds three descriptors per board (its connection and the wake-up pair of the handle's multi):
        # the fleet is split over load generators of at most PER_LOADGEN boards, each within its own open-file limit.
        parts = -(-fleet // PER_LOADGEN)
        began = time.monotonic()
        loads = []
        for k in range(parts):
            share = fleet // parts + (1 if k < fleet % parts else 0)
            loads.append(subprocess.Popen(
                [RELEASE / "whittle-loadgen", *[a for url in urls for a in ("--coordinator", url)], "--ca", first / "ca.pem",
                 "--token", token(first, share), "--workers", str(share), "--concurrency", str(min(share, 100)),
                 "--seconds", str(seconds), "--period", str(period)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        rows = []
        for load in loads:
            out, err = load.communicate(timeout=seconds + 1800)
            if load.returncode != 0:
                raise SystemExit(f"whittle-loadgen failed: {err}")
            rows.append(json.loads(out))
        # Sums, and for the percentiles the worst of the parts (each part's boards are spread over the same period).
        row = {key: sum(r[key] for r in rows) for key in ("workers", "requests", "errors", "requestsPerSecond",
                                                          "connectRequests", "connectErrors")}
        for key in ("p50Milliseconds", "p99Milliseconds", "p99LagMilliseconds", "connectP99Milliseconds", "enrollSeconds", "seconds"):
            row[key] = max(r[key] for r in rows)
        row["loadGenerators"] = parts
        row["replicaCPUSeconds"] = [rounds.cpu_seconds(p.pid) - c for p, c in zip(processes, cpu0)]
        row["databaseCPUSeconds"] = cluster.cpu_seconds() - database0
        row["replicaPeakRSSMiB"] = [rss_peak_mib(p.pid) for p in processes]
        row["wallSeconds"] = time.monotonic() - began
        row["period"] = period
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        # The replicas' logs outlive the temporary directory, for a look at what went wrong.
        kept = pathlib.Path(tempfile.gettempdir()) / "whittle-replicas-bench"
        kept.mkdir(exist_ok=True)
        for k in range(len(processes)):
            shutil.copy(pathlib.Path(tmp) / f"replica-{k}.log", kept / f"replica-{k}.log")
    per_heartbeat = 1000 * sum(row["replicaCPUSeconds"]) / max(row["requestsPerSecond"] * row["seconds"], 1)
    print(f"{int(row['workers'])} boards polling every {period:g} s through 2 replicas on PostgreSQL: "
          f"{row['requestsPerSecond']:.0f} heartbeats/s, p50 {row['p50Milliseconds']:.2f} ms, p99 {row['p99Milliseconds']:.2f} ms, "
          f"{int(row['errors'])} errors (goal 0 errors, p99 under 250 ms), sends at most {row['p99LagMilliseconds']:.0f} ms late (p99); "
          f"enrolling them took {row['enrollSeconds']:.1f} s ({row['loadGenerators']} load generators)")
    print(f"  the first cycle (every board opening its connection at once, not measured above): "
          f"{int(row['connectRequests'])} answered, p99 {row['connectP99Milliseconds']:.0f} ms, {int(row['connectErrors'])} errors")
    print(f"  replica CPU {', '.join(f'{c:.1f} s' for c in row['replicaCPUSeconds'])} ({per_heartbeat:.2f} ms per heartbeat, "
          f"enrollment included); PostgreSQL {row['databaseCPUSeconds']:.1f} s; replica peak RSS "
          f"{', '.join(f'{m:.0f} MiB' for m in row['replicaPeakRSSMiB'])}")
    return row


def main():
    print(machine.banner())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fleet", type=int, default=10000, help="simulated boards")
    parser.add_argument("--period", type=float, default=10, help="seconds between a board's heartbeats")
    parser.add_argument("--seconds", type=float, default=60, help="how long the fleet polls")
    parser.add_argument("--skip-rounds", action="store_true", help="only the heartbeat part")
    args = parser.parse_args()
    for binary in ("coordinator", "worker", "whittle-loadgen"):
        if not (RELEASE / binary).exists():
            raise SystemExit("build first: swift build -c release --product coordinator --product worker --product whittle-loadgen")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the load generators and the replicas
    results = {"machine": machine.describe(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # the postgres user enters it when this runs as root
        cluster = Cluster(pathlib.Path(tmp) / "pg")
        try:
            if not args.skip_rounds:
                results["rounds"] = compare_stores(cluster, tmp)
            results["heartbeats"] = heartbeats(cluster, tmp, args.fleet, args.period, args.seconds)
        finally:
            cluster.stop()
    (ROOT / "benchmarks" / "last-replicas.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
