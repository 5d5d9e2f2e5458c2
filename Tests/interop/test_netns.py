"""A fleet across network namespaces: `deploy/netns-fleet.sh` runs the coordinator and three workers, each in its own
Linux network namespace with its own IPv4 address, joined by veth pairs to a bridge in a namespace of its own. The
test checks that enrollment, heartbeats, a federated round (int8, minmax calibration, no pruning) and revocation
all work over that path (real source addresses, bytes counted on the bridge ports, nothing on the workers'
loopback), that the fetched model runs in onnxruntime, and that `netns-fleet.sh down` leaves nothing behind.

Needs root and permission to create network namespaces; skipped otherwise."""
import ipaddress
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from cryptography import x509

from conftest import ROOT, _binary
from rounds_support import MODEL, load_test_split, load_train_split, non_iid_shards, onnx_accuracy

SCRIPT = ROOT / "deploy" / "netns-fleet.sh"
WORKERS = 3
SUBNET = "10.213.7"  # the coordinator is .1, worker k is .(10 + k)
COORD_IP = f"{SUBNET}.1"
PORT = 8443
UNLABELED = {"board-3"}  # one board without labels: it still calibrates and evaluates agreement
# onnxruntime accuracy of the round's int8 model on the test split, against the base model's, in points.
INT8_LOSS_POINTS = 1.0


def run(command, timeout=30, check=True):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def namespaces():
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def namespace_pids(ns):
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
    return [int(p) for p in result.stdout.split()]


def remove_namespaces(prefix):
    """The safety net: kills whatever runs in the prefix's namespaces and deletes them. Returns what it found."""
    found = [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    for ns in found:
        for pid in namespace_pids(ns):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    for ns in found:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    return found


def link(ns, name):
    """`ip -j -s link show` of one interface in a namespace."""
    (entry,) = json.loads(run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", name]).stdout)
    return entry


@pytest.fixture(scope="module")
def netns_allowed():
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip command")
    if os.geteuid() != 0:
        pytest.skip("needs root: creating network namespaces, veth pairs and bridges takes CAP_SYS_ADMIN and CAP_NET_ADMIN")
    probe = f"whittle-probe-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    if result.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {result.stderr.strip()}")


@pytest.fixture
def prefix(netns_allowed):
    """A namespace prefix of this test run; whatever the test leaves with it is removed, even on failure."""
    name = f"wt{os.getpid() % 100000}"
    assert not [ns for ns in namespaces() if ns.startswith(name + "-")], "namespaces of an earlier run are left"
    yield name
    subprocess.run(["bash", str(SCRIPT), "down", "--prefix", name], capture_output=True, timeout=60)
    remove_namespaces(name)


def write_shards(directory):
    """Non-IID shards of the training images (training data) and of the test images (held out), as the workers
    read them: DIR/board-K/{x,y,eval_x,eval_y}.npy."""
    x, y = load_train_split()
    tx, ty = load_test_split()
    shards = {}
    for k, (part, test) in enumerate(zip(non_iid_shards(y, WORKERS), non_iid_shards(ty, WORKERS, seed=1)), start=1):
        name = f"board-{k}"
        folder = directory / name
        folder.mkdir(parents=True)
        np.save(folder / "x.npy", x[part].astype(np.float32))
        if name not in UNLABELED:
            np.save(folder / "y.npy", y[part].astype(np.int64))
        np.save(folder / "eval_x.npy", tx[test].astype(np.float32))
        np.save(folder / "eval_y.npy", ty[test].astype(np.int64))
        shards[name] = (len(part), len(test))
    return shards


def test_fleet_across_network_namespaces(prefix, tmp_path):
    began = time.monotonic()
    coordinator_bin = _binary("coordinator", patience=60)
    worker_bin = _binary("worker", patience=60)
    shards = write_shards(tmp_path / "shards")
    workdir = tmp_path / "fleet"
    names = [f"board-{k}" for k in range(1, WORKERS + 1)]
    worker_ns = {name: f"{prefix}-w{k}" for k, name in enumerate(names, start=1)}
    coord_ns, switch_ns = f"{prefix}-coord", f"{prefix}-sw"

    up = subprocess.run(["bash", str(SCRIPT), "up", "--keep", "--round", "--workers", str(WORKERS), "--prefix", prefix,
                         "--subnet", SUBNET, "--port", str(PORT), "--workdir", str(workdir), "--shards",
                         str(tmp_path / "shards"), "--heartbeat-seconds", "1", "--round-timeout", "60",
                         "--coordinator-bin", str(coordinator_bin), "--worker-bin", str(worker_bin),
                         # added to `coordinator round start`: 7-bit weights, so that onnxruntime's u8×s8 kernels on
                         # CPUs without VNNI do not saturate and deployment matches the federated evaluation exactly
                         "--", "--reduce-range"],
                        capture_output=True, text=True, timeout=100)
    print(up.stdout[-3000:])
    assert up.returncode == 0, f"netns-fleet.sh up exited {up.returncode}:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
    env = dict(line.split("=", 1) for line in (workdir / "fleet.env").read_text().splitlines()
               if "=" in line and not line.startswith("#"))
    data_dir = workdir / "coordinator"
    assert env["COORD_URL"] == f"https://{COORD_IP}:{PORT}" and env["DATA_DIR"] == str(data_dir), env

    def admin(*args, timeout=30):
        return run(["ip", "netns", "exec", coord_ns, coordinator_bin, *args, "--dir", data_dir], timeout=timeout)

    # -- the network: one namespace per process, one address each, every veth peer a port of the bridge
    assert sorted(ns for ns in namespaces() if ns.startswith(prefix + "-")) == sorted([switch_ns, coord_ns, *worker_ns.values()])
    addresses = {coord_ns: COORD_IP, **{worker_ns[n]: f"{SUBNET}.{10 + k}" for k, n in enumerate(names, start=1)}}
    for ns, address in addresses.items():
        (entry,) = json.loads(run(["ip", "-n", ns, "-j", "-4", "addr", "show", "dev", "eth0"]).stdout)
        assert [(a["local"], a["prefixlen"]) for a in entry["addr_info"]] == [(address, 24)], (ns, entry)
        (details,) = json.loads(run(["ip", "-n", ns, "-d", "-j", "link", "show", "dev", "eth0"]).stdout)
        assert details["linkinfo"]["info_kind"] == "veth" and "link_netnsid" in details, f"{ns}: eth0 is not a veth peer"
        assert sorted(i["ifname"] for i in json.loads(run(["ip", "-n", ns, "-j", "link", "show"]).stdout)) == ["eth0", "lo"]
    ports = json.loads(run(["ip", "-n", switch_ns, "-j", "link", "show", "master", "br0"]).stdout)
    assert sorted(p["ifname"] for p in ports) == sorted(["coord"] + [f"w{k}" for k in range(1, WORKERS + 1)])
    assert not [a for a in json.loads(run(["ip", "-n", switch_ns, "-j", "-4", "addr", "show"]).stdout) if a.get("addr_info")
                and a["ifname"] != "lo"], "the switch namespace has no IPv4 address of its own"

    # -- the server certificate is for the coordinator's address (its IP SAN), and only that
    certificate = x509.load_pem_x509_certificate((data_dir / "server.pem").read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(COORD_IP)] and not san.get_values_for_type(x509.DNSName)
    config = (data_dir / "coordinator.conf").read_text()
    assert f"listen = {COORD_IP}:{PORT}\n" in config and f"url = https://{COORD_IP}:{PORT}\n" in config

    # -- enrolled over the veth path, heartbeating, seen from their namespaces' addresses
    workers = {w["name"]: w for w in json.loads(admin("workers", "list", "--json").stdout)}
    assert sorted(workers) == names
    for k, name in enumerate(names, start=1):
        w = workers[name]
        assert w["state"] == "online" and w["lastContactAt"], w
        assert w["address"] == f"{SUBNET}.{10 + k}", w
        assert w["capabilities"]["samples"] == shards[name][0], w
        assert w["capabilities"]["labels"] is (name not in UNLABELED), w
        status = json.loads(run(["ip", "netns", "exec", worker_ns[name], worker_bin, "status", "--dir",
                                 workdir / "workers" / name, "--json"]).stdout)
        assert status["coordinator"] == f"https://{COORD_IP}:{PORT}", status
        assert status["heartbeats"] >= 1 and status.get("lastError") is None, status
        assert status["certificateSerial"] == w["certificateSerial"]

    # -- the round the script ran: succeeded on all three sites, its model fetched and runnable by onnxruntime
    round_id = env["ROUND_ID"]
    view = json.loads(admin("round", "status", round_id, "--json").stdout)
    assert view["state"] == "succeeded", view
    sites = {s["worker"]: s for s in view["sites"]}
    assert sorted(sites) == names and all(s["received"] for s in sites.values()), view["sites"]
    model = workdir / f"round-{round_id}.onnx"
    report = json.loads((workdir / f"round-{round_id}.json").read_text())
    assert report["after"]["samples"] == sum(test for _, test in shards.values())
    tx, ty = load_test_split()
    base, compressed = onnx_accuracy(MODEL, tx, ty), onnx_accuracy(model, tx, ty)
    print(f"\nnetns round {round_id}: onnxruntime accuracy {base:.4f} -> {compressed:.4f}, "
          f"{MODEL.stat().st_size} -> {model.stat().st_size} bytes")
    assert (base - compressed) * 100 <= INT8_LOSS_POINTS, (base, compressed)
    # the federated evaluation (each board on its held-out shard) is onnxruntime's on the union of those shards
    ex = np.concatenate([np.load(tmp_path / "shards" / n / "eval_x.npy") for n in names])
    ey = np.concatenate([np.load(tmp_path / "shards" / n / "eval_y.npy") for n in names])
    assert abs(report["after"]["accuracy"] - onnx_accuracy(model, ex, ey)) < 1e-9, report["after"]
    # fetched again, now by this test, over the coordinator namespace's own interface: the same file
    again = tmp_path / "again.onnx"
    admin("round", "fetch", round_id, "--out", again)
    assert again.read_bytes() == model.read_bytes()

    # -- the traffic crossed the bridge: each worker's port carried at least what the round sent to that site and
    #    got back its reports, and nothing went over a worker's loopback
    for k, name in enumerate(names, start=1):
        port = link(switch_ns, f"w{k}")["stats64"]
        assert port["tx"]["bytes"] >= sites[name]["bytesDown"] > 0, (name, port, sites[name])
        assert port["rx"]["bytes"] >= sites[name]["bytesUp"] > 0, (name, port, sites[name])
        assert link(worker_ns[name], "lo")["stats64"]["tx"]["bytes"] == 0, f"{name} used its loopback"

    # -- revocation over the same path: the revoked worker's next heartbeat is refused and its agent stops
    admin("workers", "revoke", "board-2")
    deadline = time.monotonic() + 20
    while namespace_pids(worker_ns["board-2"]):
        assert time.monotonic() < deadline, "the revoked worker's agent is still running"
        time.sleep(0.2)
    assert "revoked" in (workdir / "logs" / "board-2.log").read_text()
    states = {w["name"]: w["state"] for w in json.loads(admin("workers", "list", "--json").stdout)}
    assert states == {"board-1": "online", "board-2": "revoked", "board-3": "online"}, states

    # -- down: stops the coordinator and the agents, removes every namespace (and with them the veths and bridge)
    pids = [pid for ns in [coord_ns, *worker_ns.values()] for pid in namespace_pids(ns)]
    assert pids
    down = run(["bash", SCRIPT, "down", "--prefix", prefix], timeout=60)
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")], down.stdout
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"process {pid} survived"
    assert not (data_dir / "listening").exists(), "coordinator serve shut down gracefully (it removes DIR/listening)"
    print(f"netns fleet test took {time.monotonic() - began:.1f} s")
