"""Progress bars: drawn on standard error when it is a terminal (a pseudo-terminal here), absent from pipes."""
import os
import pty
import select
import subprocess
import time

import numpy as np

from conftest import ROOT, _binary

MODEL = ROOT / "examples" / "models" / "defect_cnn.onnx"
BAR = "█".encode()


def on_terminal(command, timeout=300):
    """Runs `command` with standard output and error on a pseudo-terminal; returns (exit status, everything)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["COLUMNS"] = "120"
        os.execv(str(command[0]), [str(c) for c in command])
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output


def data(tmp_path, n=96):
    x = np.load(ROOT / "examples" / "data" / "defects_test_x.npy")[:n]
    y = np.load(ROOT / "examples" / "data" / "defects_test_y.npy")[:n]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return tmp_path / "x.npy", tmp_path / "y.npy"


def test_train_and_compress_draw_bars_on_a_terminal_only(tmp_path):
    worker = _binary("worker", ("release",), patience=60)
    x, y = data(tmp_path)
    train = [worker, "model", "train", MODEL, "--data", x, "--labels", y, "--epochs", "2", "--batch-size", "16",
             "--lr", "0.001", "--out", tmp_path / "t.onnx"]
    status, output = on_terminal(train)
    assert status == 0, output.decode(errors="replace")[-2000:]
    assert BAR in output and b"epoch 2/2" in output and b"\r" in output, output[-2000:]
    piped = subprocess.run([str(c) for c in train], capture_output=True, timeout=300)
    assert piped.returncode == 0 and BAR not in piped.stderr and BAR not in piped.stdout, piped.stderr[-2000:]

    compress = [worker, "model", "compress", MODEL, "--calibration-data", x, "--labels", y, "--prune-ratio", "0.3",
                "--finetune-epochs", "1", "--train-data", x, "--train-labels", y, "--out", tmp_path / "c.onnx"]
    status, output = on_terminal(compress)
    assert status == 0, output.decode(errors="replace")[-2000:]
    assert BAR in output and b"fine-tune epoch 1/1" in output, output[-2000:]
    piped = subprocess.run([str(c) for c in compress], capture_output=True, timeout=300)
    assert piped.returncode == 0 and BAR not in piped.stderr and BAR not in piped.stdout, piped.stderr[-2000:]
