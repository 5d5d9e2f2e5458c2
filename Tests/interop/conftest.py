"""Shared fixtures for the interoperability tests: they run Whittle's real binaries against onnxruntime."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "Tests" / "Fixtures" / "models"


def _binary(name, configs=("debug", "release")):
    for config in configs:
        path = ROOT / ".build" / config / name
        if path.exists():
            return path
    pytest.fail(f"{name} is not built ({'/'.join(configs)}); run `swift build` first")


def _runner(path):
    def run(*args, check=True):
        result = subprocess.run([str(path), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"coordinator {' '.join(map(str, args))} failed:\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def coordinator():
    """The debug build (what `swift build` makes)."""
    return _runner(_binary("coordinator"))


@pytest.fixture(scope="session")
def release_coordinator():
    """The release build, for tests that train (debug code is 10-50x slower in the training loops)."""
    return _runner(_binary("coordinator", ("release",)))
