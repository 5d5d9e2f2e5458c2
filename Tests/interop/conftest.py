"""Shared fixtures for the interoperability tests: they run Whittle's real binaries against onnxruntime."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "Tests" / "Fixtures" / "models"


def _binary(name):
    for config in ("debug", "release"):
        path = ROOT / ".build" / config / name
        if path.exists():
            return path
    pytest.fail(f"{name} is not built; run `swift build` first")


@pytest.fixture(scope="session")
def coordinator():
    path = _binary("coordinator")

    def run(*args, check=True):
        result = subprocess.run([str(path), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"coordinator {' '.join(map(str, args))} failed:\n{result.stderr}")
        return result

    return run
