"""Heartbeat throughput and latency over mutual TLS, and the coordinator's memory with a polling fleet.

Starts a real coordinator (release build) in a temporary data directory on loopback, enrolls worker identities with
`whittle-loadgen` (libcurl, the workers' own HTTP client), and measures:
  - requests/s and p50/p99 latency of worker heartbeats with 1, 10 and 100 concurrent connections, each a separate
    enrolled worker with its own client certificate (back-to-back requests for --seconds each);
  - the coordinator's resident memory (VmRSS) with 1,000 enrolled workers each polling once per --period seconds.

    swift build -c release --product coordinator --product whittle-loadgen
    python3 benchmarks/heartbeats.py [--seconds 5] [--fleet 1000] [--period 5]

Prints a table and writes benchmarks/last-heartbeats.json.
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import tempfile
import time
import urllib.request
import ssl
import sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parents[1]
RELEASE = ROOT / ".build" / "release"


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_coordinator(directory):
    subprocess.run([RELEASE / "coordinator", "init", "--dir", directory, "--listen", "127.0.0.1:0"], check=True,
                   capture_output=True)
    conf = pathlib.Path(directory) / "coordinator.conf"
    text = conf.read_text().replace("enroll_rate_per_second = 5.0", "enroll_rate_per_second = 100000.0")
    conf.write_text(text.replace("enroll_burst = 20", "enroll_burst = 100000"))
    process = subprocess.Popen([RELEASE / "coordinator", "serve", "--dir", directory], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "LOG_LEVEL": "warning"})
    listening = pathlib.Path(directory) / "listening"
    for _ in range(200):
        if listening.exists():
            break
        time.sleep(0.05)
    url = listening.read_text().strip()
    context = ssl.create_default_context(cafile=str(pathlib.Path(directory) / "ca.pem"))
    urllib.request.urlopen(url + "/healthz", context=context).read()
    return process, url


def token(directory, uses):
    out = subprocess.run([RELEASE / "coordinator", "token", "create", "--dir", directory, "--uses", str(uses), "--ttl",
                          "1h", "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["token"]


def loadgen(directory, url, workers, concurrency, seconds, period=None):
    args = [RELEASE / "whittle-loadgen", "--coordinator", url, "--ca", pathlib.Path(directory) / "ca.pem", "--token",
            token(directory, workers), "--workers", str(workers), "--concurrency", str(concurrency), "--seconds",
            str(seconds)]
    if period:
        args += ["--period", str(period)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def main():
    print(machine.banner())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="duration of each throughput phase")
    parser.add_argument("--fleet", type=int, default=1000, help="workers enrolled and polling for the memory phase")
    parser.add_argument("--period", type=float, default=5, help="seconds between a polling worker's heartbeats")
    args = parser.parse_args()
    for binary in ("coordinator", "whittle-loadgen"):
        if not (RELEASE / binary).exists():
            raise SystemExit(f"build first: swift build -c release --product coordinator --product whittle-loadgen")
    results = {"machine": machine.describe(), "rows": [], "fleet": None}
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_coordinator(tmp)
        try:
            idle = rss_kib(process.pid)
            for concurrency in (1, 10, 100):
                out, _ = loadgen(tmp, url, concurrency, concurrency, args.seconds).communicate()
                row = json.loads(out)
                row["coordinatorRSSKiB"] = rss_kib(process.pid)
                results["rows"].append(row)
            fleet = loadgen(tmp, url, args.fleet, min(args.fleet, 50), args.seconds + 3 * args.period, args.period)
            peak = 0
            while fleet.poll() is None:
                peak = max(peak, rss_kib(process.pid))
                time.sleep(0.5)
            row = json.loads(fleet.stdout.read())
            row["coordinatorPeakRSSKiB"] = peak
            row["coordinatorIdleRSSKiB"] = idle
            results["fleet"] = row
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    print("Heartbeats over mutual TLS on loopback (each connection a separate enrolled worker)")
    print(f"{'connections':>11} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'coordinator RSS MiB':>20}")
    for r in results["rows"]:
        print(f"{int(r['concurrency']):>11} {r['requestsPerSecond']:>11.0f} {r['p50Milliseconds']:>8.2f} "
              f"{r['p99Milliseconds']:>8.2f} {int(r['errors']):>7} {r['coordinatorRSSKiB'] / 1024:>20.1f}")
    f = results["fleet"]
    print(f"\n{int(f['workers'])} enrolled workers polling every {args.period:g} s: {f['requestsPerSecond']:.0f} "
          f"heartbeats/s, p50 {f['p50Milliseconds']:.2f} ms, p99 {f['p99Milliseconds']:.2f} ms, {int(f['errors'])} errors; "
          f"coordinator RSS {f['coordinatorIdleRSSKiB'] / 1024:.1f} MiB idle, {f['coordinatorPeakRSSKiB'] / 1024:.1f} MiB peak; "
          f"enrolling them took {f['enrollSeconds']:.1f} s")
    (ROOT / "benchmarks" / "last-heartbeats.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
