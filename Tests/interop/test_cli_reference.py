"""docs/cli.md is generated from the binaries' help text by scripts/cli-reference; this test regenerates it in memory
(`--check`) and fails with the diff when the committed file is stale."""
import subprocess
import sys

import pytest

from conftest import ROOT, _binary

GENERATOR = ROOT / "scripts" / "cli-reference"


def test_cli_reference_is_current():
    coordinator = _binary("coordinator", patience=60)
    worker = _binary("worker", patience=60)
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--coordinator", str(coordinator), "--worker", str(worker)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode == 1:
        pytest.fail("docs/cli.md does not match the binaries' --help: run scripts/cli-reference\n\n"
                    f"{result.stdout}")
    assert result.returncode == 0, f"scripts/cli-reference --check failed ({result.returncode}):\n" \
                                   f"{result.stdout}{result.stderr}"
