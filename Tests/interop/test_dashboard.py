"""The web dashboard in headless Chromium: a real coordinator, real workers and a real pruning + int8 round; the
browser logs in through a one-time link from `coordinator dashboard`, trusting exactly the coordinator's server key,
and the page it renders shows the workers, the round, the accuracy-versus-size plot and the per-site table."""
import base64
import hashlib
import json
import re
import shutil
import struct
import subprocess
import zlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rounds_support import MODEL, ROOT
from test_rounds import make_fleet

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/install-deps installs it)")


def spki_hash(server_pem):
    certificate = x509.load_pem_x509_certificate(server_pem.read_bytes())
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def chromium(url, server, profile, *mode):
    """Headless Chromium on `url`, trusting the coordinator's server key only, with time for the page's fetches."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
               f"--ignore-certificate-errors-spki-list={spki_hash(server.dir / 'server.pem')}",
               "--virtual-time-budget=15000", "--window-size=1400,1900", *mode, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def png_pixels(path):
    """Width, height and RGB rows of an 8-bit RGB/RGBA PNG (the format Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    idat = b""
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if kind == b"IHDR":
            chunks["IHDR"] = body
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks["IHDR"][:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    channels = 3 if color == 2 else 4
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


def count_color(rows, channels, rgb, tolerance=12):
    total = 0
    for row in rows:
        for i in range(0, len(row), channels):
            if all(abs(row[i + k] - rgb[k]) <= tolerance for k in range(3)):
                total += 1
    return total


def test_dashboard_shows_workers_rounds_and_plots_with_real_data(coordinator_server, worker_path, tmp_path,
                                                                  spawn_any):
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, workers=3, samples=300)
    for name in names:
        fleet.start_worker(name)
    started = fleet.round("start", "--model", MODEL, "--prune-ratio", "0.5", "--prune-scope", "local", "--importance", "l1",
                          "--finetune-rounds", "2", "--local-epochs", "1", "--lr", "0.005", "--distill", "--quantize", "int8",
                          "--calibration", "minmax", "--reduce-range", "--min-workers", "3", "--phase-deadline", "5m",
                          # A short recipe (the dashboard is under test, not the model): let the quality gate pass it.
                          "--max-accuracy-drop", "1", "--json")
    round_id = json.loads(started.stdout)["id"]
    ended = fleet.wait(round_id, timeout=600)
    assert ended["state"] == "succeeded", ended.get("message")
    report = json.loads(fleet.round("status", round_id, "--json").stdout)

    server = fleet.server
    # Without a session: the login page, and the API refuses.
    anonymous = server.request("GET", "/dashboard")
    assert anonymous.status == 401 and b"coordinator dashboard --dir" in anonymous.body
    assert server.request("GET", "/dashboard/api/rounds").status == 401
    link = json.loads(server.cli("dashboard", "--dir", server.dir, "--json").stdout)["url"]
    assert link.startswith(server.url + "/dashboard/login?token=")

    dom = chromium(link, server, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "3 workers (3 online)" in html and "1 rounds (0 running)" in html, html[:3000]
    for name in names:
        assert html.count(f"<td>{name}</td>") == 2, name  # the workers table and the per-site table
    assert round_id in html and 'class="state succeeded"' in html
    assert len(re.findall(r'<circle[^>]*class="site"', html)) == 2 * len(names)
    assert len(re.findall(r'<circle[^>]*class="fleet"', html)) == 2
    assert len(re.findall(r'<rect[^>]*class="phase"', html)) == len(report["phases"])
    assert "× smaller" in html and "pts" in html
    # Latency per site, timed on the worker at batch 1 and at its working batch: the speed-up column, its tooltip
    # with medians and 90th percentiles, and the fleet's speed-up among the model's figures.
    for site in report["sites"]:
        assert [t["batch"] for t in site["latency"]][0] == 1 and len(site["latency"]) == 2, site
        assert all(t["base"]["p50Ms"] <= t["base"]["p90Ms"] for t in site["latency"]), site
    assert len(re.findall(r"\d+\.\d\d× · \d+\.\d\d× @\d+", html)) == len(names), html[:3000]
    assert len(re.findall(r'title="batch 1, \d+ runs: before [\d.]+ ms \(p90 [\d.]+\)', html)) == len(names)
    assert "speed-up on the boards" in html and "at the working batch" in html

    # The same link again is spent: a second browser gets the login page.
    spent = chromium(link, server, tmp_path / "profile-spent", "--dump-dom")
    assert "coordinator dashboard --dir" in spent.stdout and "Workers" not in spent.stdout

    link = json.loads(server.cli("dashboard", "--dir", server.dir, "--json").stdout)["url"]
    shot = tmp_path / "dashboard.png"
    result = chromium(link, server, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, channels, rows = png_pixels(shot)
    assert (width, height) == (1400, 1900)
    # The plot's marks in their colours: the compressed fleet point (orange), the sites' after points (blue), the
    # done phases' bars (blue), the header (dark).
    assert count_color(rows, channels, (0xE0, 0x66, 0x3B)) > 60, "no compressed-model point in the screenshot"
    assert count_color(rows, channels, (0x3B, 0x6F, 0xE0)) > 2000, "no phase bars or site points in the screenshot"
    assert count_color(rows, channels, (0x1D, 0x23, 0x30)) > 20000, "no header in the screenshot"
    kept = ROOT / ".build" / "test-artifacts" / "dashboard.png"  # for a human to look at
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, kept)
    fleet.stop_workers()


def test_dashboard_plots_a_search_rounds_candidates(coordinator_server, worker_path, tmp_path, spawn_any):
    fleet, names = make_fleet(coordinator_server, worker_path, tmp_path, spawn_any, workers=2, samples=200)
    for name in names:
        fleet.start_worker(name)
    started = fleet.round("start", "--model", MODEL, "--macs-budget", "30%", "--candidates", 8, "--population", 4,
                          "--adaptation-batches", 2, "--finetune-rounds", 1, "--quantize", "none", "--min-workers", 2,
                          # A short recipe (the dashboard is under test, not the model): let the quality gate pass it.
                          "--phase-deadline", "5m", "--max-accuracy-drop", "1", "--min-agreement", "0", "--json")
    round_id = json.loads(started.stdout)["id"]
    ended = fleet.wait(round_id, timeout=600)
    assert ended["state"] == "succeeded", ended.get("message")
    server = fleet.server
    link = json.loads(server.cli("dashboard", "--dir", server.dir, "--json").stdout)["url"]
    dom = chromium(link, server, tmp_path / "profile-search", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="search-box"' in html and 'id="search-box" hidden' not in html, html[:3000]
    # Every candidate a grey dot with its widths; the uniform reference and the choice marked; the front joined;
    # the budget's line; the x axis in MACs (no latency budget).
    assert len(re.findall(r'<circle[^>]*class="candidate"', html)) == 8
    assert len(re.findall(r'<circle[^>]*class="uniform"', html)) == 1
    assert len(re.findall(r'<circle[^>]*class="chosen"', html)) == 1
    assert "MACs per sample" in html and "<title>chosen: " in html and "features.4.0=" in html
    link = json.loads(server.cli("dashboard", "--dir", server.dir, "--json").stdout)["url"]
    shot = tmp_path / "search.png"
    result = chromium(link, server, tmp_path / "profile-search-shot", f"--screenshot={shot}", "--window-size=1400,2600")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    kept = ROOT / ".build" / "test-artifacts" / "dashboard-search.png"  # for a human to look at
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, kept)
    fleet.stop_workers()
