"""A federated fleet on loopback for round tests and benchmarks: a real `coordinator serve` (mutual TLS) and real
`worker run` processes, each with its own non-IID shard of the shipped defect-inspection images."""
import contextlib
import json
import pathlib
import subprocess
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
MODEL = ROOT / "examples" / "models" / "defect_cnn.onnx"


def generated_split(split, sizes):
    """A git-ignored split of the demo images: from examples/data if generated there, else made (deterministically,
    by scripts/make_demo_data.py with `sizes`, the other splits' sizes 0) into a cache folder."""
    x, y = DATA / f"defects_{split}_x.npy", DATA / f"defects_{split}_y.npy"
    if not x.exists():
        cache = ROOT / ".build" / "demo-data"
        x, y = cache / f"defects_{split}_x.npy", cache / f"defects_{split}_y.npy"
        if not x.exists():
            counts = {"--train": "0", "--test": "0", "--holdout": "0", **sizes}
            subprocess.run(["python3", str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(cache),
                            *[a for pair in counts.items() for a in pair]], check=True, capture_output=True)
    return np.load(x), np.load(y)


def load_train_split():
    """The 4,000 training images."""
    return generated_split("train", {"--train": "4000"})


def load_test_split():
    return np.load(DATA / "defects_test_x.npy"), np.load(DATA / "defects_test_y.npy")


HOLDOUT_SIZE = 16384


def load_holdout_split():
    """16,384 further images from the generator (seed 20240603), never trained or calibrated on: the quality goals
    are judged on them, as the 512 test images measure a difference between two models only to about a point."""
    return generated_split("holdout", {"--holdout": str(HOLDOUT_SIZE)})


def onnx_accuracy(path, x, y):
    """Top-1 accuracy of the ONNX model at `path` in onnxruntime (CPU) on images `x` with labels `y`."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 512]})[0] for i in range(0, len(x), 512)])
    return float((logits.argmax(1) == y).mean())


@contextlib.contextmanager
def loopback_fleet(binaries, directory, **settings):
    """A `coordinator serve` from `binaries` in `directory` with `settings` in its coordinator.conf, and a Fleet of
    its workers; every process started through the fleet is stopped, and the coordinator too, on leaving."""
    from conftest import CoordinatorServer, launch
    directory = pathlib.Path(directory)
    processes = []

    def spawn(*command, **kwargs):
        process = launch(command, **kwargs)
        processes.append(process)
        return process

    server = CoordinatorServer(pathlib.Path(binaries) / "coordinator", directory / "coord", directory / "coord.log")
    server.init()
    server.configure(**settings)
    if settings.get("database_url"):
        server.cli("migrate", "--dir", server.dir)
    server.start()
    try:
        yield Fleet(server, pathlib.Path(binaries) / "worker", directory, spawn)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        if server.running:
            server.stop(stop_timeout=30)


def non_iid_shards(labels, workers, dominant=0.6, seed=0):
    """Indices per worker: worker k draws `dominant` of its samples from class k mod C and the rest evenly from
    the other classes (label skew), without overlap."""
    rng = np.random.default_rng(seed)
    classes = int(labels.max()) + 1
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(classes)}
    per_worker = len(labels) // workers
    shards = [[] for _ in range(workers)]
    for k in range(workers):
        main = k % classes
        want = {c: int(per_worker * (dominant if c == main else (1 - dominant) / (classes - 1))) for c in range(classes)}
        for c, n in want.items():
            take, pools[c] = pools[c][:n], pools[c][n:]
            shards[k] += take
    return [np.array(sorted(s)) for s in shards]


class Fleet:
    """`coordinator` is a CoordinatorServer (conftest); workers are started with `add_worker`."""

    def __init__(self, server, worker_binary, directory, spawn):
        self.server = server
        self.worker_binary = worker_binary
        self.dir = pathlib.Path(directory)
        self.spawn = spawn
        self.workers = {}
        self.processes = {}

    def enroll(self, names):
        token = self.server.token(uses=len(names))
        for name in names:
            result = subprocess.run([str(self.worker_binary), "enroll", "--coordinator", self.server.url, "--token",
                                     token["token"], "--ca-fingerprint", token["caFingerprint"], "--dir",
                                     str(self.dir / name), "--name", name], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr

    def write_shard(self, name, x, y=None, eval_x=None, eval_y=None):
        folder = self.dir / f"{name}-data"
        folder.mkdir(parents=True, exist_ok=True)
        files = {"x": folder / "x.npy"}
        np.save(files["x"], x.astype(np.float32))
        if y is not None:
            files["y"] = folder / "y.npy"
            np.save(files["y"], y.astype(np.int64))
        if eval_x is not None:
            files["eval_x"] = folder / "eval_x.npy"
            np.save(files["eval_x"], eval_x.astype(np.float32))
            if eval_y is not None:
                files["eval_y"] = folder / "eval_y.npy"
                np.save(files["eval_y"], eval_y.astype(np.int64))
        self.workers[name] = files
        return files

    def start_demo_workers(self, count, samples):
        """Enrolls `camera-0`… `camera-{count-1}`, gives each `samples` labelled images of its own non-IID shard of
        the demo's training split, and starts them; returns their names."""
        names = [f"camera-{k}" for k in range(count)]
        self.enroll(names)
        x, y = load_train_split()
        shards = non_iid_shards(y, count)
        for k, name in enumerate(names):
            part = shards[k][:samples]
            self.write_shard(name, x[part], y[part])
        for name in names:
            self.start_worker(name)
        return names

    def start_worker(self, name, *extra):
        files = self.workers[name]
        args = [self.worker_binary, "run", "--dir", self.dir / name, "--data", files["x"], "--threads", "1"]
        if "y" in files:
            args += ["--labels", files["y"]]
        if "eval_x" in files:
            args += ["--eval-data", files["eval_x"]]
        if "eval_y" in files:
            args += ["--eval-labels", files["eval_y"]]
        log = open(self.dir / f"{name}.log", "ab")
        self.processes[name] = self.spawn(*args, *extra, stdout=log, stderr=subprocess.STDOUT)
        return self.processes[name]

    def stop_workers(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def worker_log(self, name):
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def round(self, *args, check=True, timeout=60):
        result = self.server.cli("round", *args, "--dir", self.server.dir, check=check, timeout=timeout)
        return result

    def status(self, round_id):
        return json.loads(self.round("status", round_id, "--json").stdout)

    def wait(self, round_id, timeout=600, until=("succeeded", "failed", "cancelled")):
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(round_id)
            if status["state"] in until:
                return status
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.worker_log(n)}" for n in self.workers)
                raise AssertionError(f"round {round_id} did not end within {timeout} s: {json.dumps(status)[:3000]}\n"
                                     f"{self.server.log()}\n{logs}")
            time.sleep(0.5)
