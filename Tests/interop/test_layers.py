"""The layering in docs/architecture.md, checked against the code: every module a target imports is declared in
Package.swift (so nothing links by accident through another target), and the pure core imports nothing that does
I/O or talks to a terminal: no store, no server, no network, no command-line parsing, no logging."""
import json
import re
import subprocess

import pytest

from conftest import ROOT

# Modules every target may import without declaring them (the toolchain's).
SYSTEM = {"Foundation", "Glibc", "Dispatch", "Synchronization", "FoundationEssentials", "Darwin"}
# The pure core: tensors, the model engine, compression math, wire messages and round logic.
PURE = ["WhittleTensor", "WhittleONNX", "WhittleNN", "WhittleCompression", "WhittleProtocol", "WhittleRounds", "WhittlePrivacy"]
# What does I/O, holds state on disk, serves or talks to a terminal.
IMPURE = {"WhittleStore", "WhittleServer", "WhittleAgent", "WhittleHTTPClient", "WhittleCLI", "WhittlePKI", "CWhittleCurl",
          "GRDB", "Hummingbird", "HummingbirdCore", "HummingbirdTLS", "NIOCore", "NIOPosix", "NIOSSL", "ArgumentParser",
          "Logging", "Prometheus", "ServiceLifecycle"}
IMPORT = re.compile(r"^\s*(?:@testable\s+|@_exported\s+|package\s+|public\s+|internal\s+)?import\s+(?:struct\s+|class\s+|enum\s+|func\s+)?([A-Za-z_][A-Za-z0-9_]*)", re.M)


@pytest.fixture(scope="module")
def targets():
    dump = subprocess.run(["swift", "package", "dump-package"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    out = {}
    for t in json.loads(dump.stdout)["targets"]:
        if t["type"] not in ("regular", "executable"):
            continue
        declared = set()
        for d in t["dependencies"]:
            if "byName" in d:
                declared.add(d["byName"][0])
            elif "product" in d:
                declared.add(d["product"][0])
            elif "target" in d:
                declared.add(d["target"][0])
        folder = ROOT / (t.get("path") or f"Sources/{t['name']}")
        imports = {}
        for source in sorted(folder.rglob("*.swift")):
            for module in IMPORT.findall(source.read_text()):
                imports.setdefault(module, source.relative_to(ROOT))
        out[t["name"]] = (declared, imports)
    return out


def test_every_import_is_declared(targets):
    undeclared = [f"{name} imports {module} ({where}) without declaring it"
                  for name, (declared, imports) in targets.items()
                  for module, where in imports.items() if module not in SYSTEM and module not in declared and module != name]
    assert not undeclared, "\n".join(undeclared)


@pytest.mark.parametrize("name", PURE)
def test_the_pure_core_does_no_io(name, targets):
    declared, imports = targets[name]
    assert not (set(imports) | declared) & IMPURE, f"{name} reaches {sorted((set(imports) | declared) & IMPURE)}"


@pytest.mark.parametrize("name", ["WhittleServer", "WhittleAgent"])
def test_the_server_and_agent_parse_no_command_line(name, targets):
    """Commands live above the libraries (CoordinatorCommands, WorkerCommands, WhittleCLI), used by the executables."""
    declared, imports = targets[name]
    assert "ArgumentParser" not in set(imports) | declared, f"{name} imports ArgumentParser ({imports.get('ArgumentParser')})"


def closure(name, targets):
    """Every target `name` links, through declared target dependencies."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in targets:
            continue
        seen.add(current)
        todo.extend(targets[current][0])
    return seen - {name}


def test_the_wire_protocol_links_no_numeric_code(targets):
    """WhittleProtocol is messages and identifier grammar: what speaks only the protocol (the heartbeat load
    generator) links neither the compression code nor oneDNN."""
    for name in ["WhittleProtocol", "whittle-loadgen"]:
        linked = closure(name, targets) | targets[name][0]
        assert not linked & {"WhittleCompression", "WhittleNN", "WhittleONNX", "WhittleTensor", "CWhittleDNNL"}, \
            f"{name} links {sorted(linked & {'WhittleCompression', 'WhittleNN', 'WhittleONNX', 'WhittleTensor', 'CWhittleDNNL'})}"
