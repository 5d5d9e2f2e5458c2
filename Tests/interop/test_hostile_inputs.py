"""Hostile and malformed model files and .npy inputs (see hostile_models.py) against the release `coordinator`:
each must be refused with a clear error on stderr and exit status 1 — no trap or signal, no hang, no huge
allocation (the binary runs under a 4 GiB address-space limit, so a giant allocation fails fast instead of eating
the machine; failing that way is a crash too)."""
import pathlib
import resource
import shutil
import signal
import subprocess

import numpy as np
import pytest

import hostile_models
from conftest import ROOT, _binary, launch

TIMEOUT = 60  # seconds per command
MEMORY_LIMIT = 4 << 30  # RLIMIT_AS, bytes

# Text the Swift runtime, the C library or the kernel prints when the process dies instead of refusing.
CRASH_TEXT = ("Fatal error", "Illegal instruction", "Trace/breakpoint", "Segmentation", "Swift runtime failure",
              "Stack dump", "Current stack trace", "Aborted", "core dumped", "Bus error", "Killed",
              "Floating point exception", "Precondition failed", "Assertion failed", "Out of memory")

# Text of an error that is not a clear refusal: a raw Foundation error dump (e.g. a read that failed because the
# binary tried to load a huge or endless file into memory and hit the address-space limit).
UNCLEAR_TEXT = ("NSCocoaErrorDomain", "NSPOSIXErrorDomain", "(null)")

CASES = hostile_models.all_cases()
BASELINES = hostile_models.baseline_cases()


def limit_resources():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def write_model(case, folder):
    path = folder / "model.onnx"
    model = case.model
    if isinstance(model, pathlib.Path):
        shutil.copyfile(model, path)
    elif isinstance(model, (bytes, bytearray)):
        path.write_bytes(bytes(model))
    elif callable(model):
        model(path)
    else:
        path.write_bytes(model.SerializeToString())
    return path


def write_input(case, folder):
    path = folder / "input.npy"
    data = hostile_models.default_input() if case.input is None else case.input
    if isinstance(data, (bytes, bytearray)):
        path.write_bytes(bytes(data))
    else:
        np.save(path, np.asarray(data))
    return path


def run_case(binary, case, command, folder):
    """Writes the case's files into `folder` and runs the command; returns (returncode or None on timeout, stdout,
    stderr, argv)."""
    if case.setup is not None:
        case.setup(folder)
    model = write_model(case, folder)
    if command == "inspect":
        args = [binary, "model", "inspect", model]
    else:
        args = [binary, "model", "run", model, "--input", write_input(case, folder), "--output", folder / "out.npy"]
    process = launch(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     preexec_fn=limit_resources)
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace"), args
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace"), args


def describe(returncode):
    if returncode is None:
        return f"timeout after {TIMEOUT} s (hang)"
    if returncode < 0:
        try:
            return f"{returncode} (killed by {signal.Signals(-returncode).name})"
        except ValueError:
            return f"{returncode} (killed by signal {-returncode})"
    return str(returncode)


def tail(text, lines=12):
    rows = text.strip().splitlines()
    return "\n".join(rows[-lines:]) if rows else "<empty>"


def compare_with_onnxruntime(case, folder):
    """For a lenient case Whittle ran: a description of how its output differs from onnxruntime's, or None."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: np.load(folder / "input.npy")})[0]
    ours = np.load(folder / "out.npy")
    if ours.shape != expected.shape:
        return f"shape {ours.shape}, onnxruntime {expected.shape}"
    if not np.allclose(ours, expected, rtol=1e-5, atol=1e-6):
        return f"values differ by up to {np.abs(ours - expected).max()}"
    return None


def head(text, lines=6):
    """The first lines of stderr: where the Swift runtime names a trap (the tail is its backtrace)."""
    rows = text.strip().splitlines()
    return "\n".join(rows[:lines]) if rows else "<empty>"


def parameters(cases):
    return [pytest.param(case, command, id=f"{case.name}-{command}") for case in cases for command in case.commands]


@pytest.mark.parametrize("case, command", parameters(CASES))
def test_hostile_input_is_refused(coordinator_path, tmp_path, case, command):
    returncode, out, err, args = run_case(coordinator_path, case, command, tmp_path)
    headline = (f"HOSTILE-FAIL case={case.name} cmd={command} rc={describe(returncode)} "
                f"stderr_tail={' | '.join(tail(err, 3).splitlines())!r}")
    context = (f"{headline}\n  {case.description}\n  $ {' '.join(map(str, args))}\n"
               f"  stdout (tail):\n{tail(out)}\n  stderr (head):\n{head(err)}\n  stderr (tail):\n{tail(err)}")
    problems = []
    if returncode is None:
        problems.append(f"did not finish within {TIMEOUT} s")
    elif returncode == 0 and not case.lenient:
        problems.append("exited 0: the hostile input was ACCEPTED")
    elif returncode not in (0, 1):
        problems.append(f"exit status {describe(returncode)}, expected 1 (a crash, signal or other failure)")
    if returncode != 0 and not err.strip():
        problems.append("stderr is empty: no error message")
    if returncode == 0 and case.lenient and command == "run":
        mismatch = compare_with_onnxruntime(case, tmp_path)
        if mismatch:
            problems.append(f"accepted a spec-valid extreme model but computed it wrongly: {mismatch}")
    crashes = [text for text in CRASH_TEXT if text.lower() in err.lower()]
    if crashes:
        problems.append(f"stderr shows a crash: {crashes}")
    unclear = [text for text in UNCLEAR_TEXT if text in err]
    if unclear:
        problems.append(f"the error is not a clear message (it shows {unclear})")
    for text in case.expect:
        if text.lower() not in err.lower():
            problems.append(f"the error does not mention {text!r}")
    for text in case.forbid:
        if text in out or text in err:
            problems.append(f"the output contains {text!r} (a file it must not read was read)")
    assert not problems, "; ".join(problems) + "\n" + context


@pytest.mark.parametrize("case, command", parameters(BASELINES))
def test_baseline_template_is_accepted(coordinator_path, tmp_path, case, command):
    """The hostile cases' templates with harmless values run fine under the same limits, so each hostile case is
    refused for its hostile part."""
    returncode, out, err, args = run_case(coordinator_path, case, command, tmp_path)
    assert returncode == 0, (f"baseline {case.name} ({command}) exited {describe(returncode)}:\n"
                             f"$ {' '.join(map(str, args))}\n{tail(out)}\n{tail(err)}")


def test_case_files_are_small():
    """Hostile sizes come from values, not data: every generated model stays tiny."""
    for case in CASES + BASELINES:
        model = case.model
        if isinstance(model, (bytes, bytearray)):
            size = len(model)
        elif hasattr(model, "ByteSize"):
            size = model.ByteSize()
        else:
            continue  # fixtures and file writers (e.g. the sparse file)
        assert size < 256 << 10, f"{case.name} is {size} bytes"
        if isinstance(case.input, (bytes, bytearray)):
            assert len(case.input) < 1 << 20, f"{case.name}: input is {len(case.input)} bytes"


@pytest.mark.parametrize("target", ["onnx", "npy", "coordinator", "worker"])
def test_fuzz_corpus_replays(target):
    """The fuzz targets' seed corpus (Tests/Fixtures/fuzz, made by scripts/make_fuzz_corpus.py, and any input a fuzzing
    run found that once crashed, added there) runs through the normal release build of each target without a
    crash: the regression half of scripts/fuzz."""
    binary = _binary("whittle-fuzz", patience=60)
    files = sorted((ROOT / "Tests" / "Fixtures" / "fuzz" / target).iterdir())
    assert len(files) >= 5, f"the {target} corpus is missing: run scripts/make_fuzz_corpus.py"
    result = subprocess.run([str(binary), target, *map(str, files)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{target}: {len(files)} inputs, none crashed" in result.stdout
