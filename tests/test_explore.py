"""The explorer page (linattn.explore, ``linattn explore``): self-contained, and, in headless Chromium,
rendered with the slider changing the numbers."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from linattn.cli import main
from linattn.compare import CompareRow
from linattn.explore import explorer_html, write_explorer

LENGTHS = (16, 64, 256)
SETTINGS = {"batch": 1, "heads": 2, "dim": 8, "dtype": "float32", "causal": True, "repeats": 1}


def measured_rows() -> list[CompareRow]:
    """Distinct numbers per method and length, so that each cell tells which row it shows."""
    rows = []
    for i, method in enumerate(("softmax", "flash", "linear")):
        for j, length in enumerate(LENGTHS):
            rows.append(CompareRow(method, length, rel_error=10.0 ** -(7 - i - j), seconds=1e-3 * (i + 1) * 4**j,
                                   peak_bytes=2**20 * (3 * i + j + 1), error_against="softmax"))
    return rows


def test_the_page_is_self_contained_and_embeds_every_row() -> None:
    page = explorer_html(measured_rows(), SETTINGS)
    assert "http" not in page  # no stylesheet, script, font or image is fetched
    assert not re.search(r"""(src|href)\s*=""", page)
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert data.count('"method"') == len(measured_rows())
    assert 'type="range"' in page


def test_the_page_cannot_be_closed_early_by_its_data() -> None:
    rows = [CompareRow("</script><b>", 16, 1e-3, 1e-3, 1)]
    page = explorer_html(rows, SETTINGS)
    assert page.count("</script>") == 2  # the data's own "</" is escaped


def test_an_empty_measurement_is_refused() -> None:
    with pytest.raises(ValueError, match="rows"):
        explorer_html([], SETTINGS)


def test_linattn_explore_measures_and_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "page.html"
    assert main(["explore", "--lengths", "16,32", "--dim", "4", "--heads", "1", "--repeats", "1",
                 "--methods", "softmax", "flash", "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert '"method": "flash", "length": 32' in page
    assert "wrote" in capsys.readouterr().out


def test_linattn_explore_from_compare_json(tmp_path: Path) -> None:
    compare_json, out = tmp_path / "c.json", tmp_path / "page.html"
    assert main(["compare", "--lengths", "8", "--dim", "4", "--heads", "1", "--repeats", "1", "--methods", "softmax",
                 "--json", str(compare_json)]) == 0
    assert main(["explore", "--from-json", str(compare_json), "--out", str(out)]) == 0
    assert '"method": "softmax", "length": 8' in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("args", [["--out", "/nonexistent/folder/page.html"], ["--from-json", "/nonexistent.json"],
                                  ["--dim", "0"]])
def test_linattn_explore_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    base = ["explore", "--lengths", "8", "--out", str(tmp_path / "p.html")]
    assert main([*base, *args]) == 2


# ---- in a browser ----


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.skip("chromium is not on PATH (CI installs Debian's chromium: apt-get install chromium)")


def browse(page: Path, fragment: str, *options: str) -> subprocess.CompletedProcess[str]:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=3000", *options, f"{page.as_uri()}{fragment}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def cells(dom: str) -> dict[tuple[str, str], str]:
    """(method, field) -> the text of its cell in the rendered table."""
    found = {}
    for method, body in re.findall(r'<tr data-method="([^"]+)"[^>]*>(.*?)</tr>', dom, re.S):
        for field, text in re.findall(r'data-field="([^"]+)">([^<]*)<', body):
            found[(method, field)] = text
    return found


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB or RGBA PNG (no interlace) into a (height, width, channels) array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    channels = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * channels)
    out = np.zeros((height, width * channels), dtype=np.int64)
    previous = np.zeros(width * channels, dtype=np.int64)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: a running sum along the row, per channel
            row = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            row = (line + previous) % 256
        else:  # Average (3), Paeth (4): each byte depends on the one before it
            row = np.zeros_like(line)
            for x in range(line.size):
                a = row[x - channels] if x >= channels else 0
                b, c = previous[x], previous[x - channels] if x >= channels else 0
                if kind == 3:
                    row[x] = (line[x] + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    row[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) % 256
        out[y] = previous = row
    return out.reshape(height, width, channels)[..., :3]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("explore") / "page.html"
    write_explorer(str(path), measured_rows(), SETTINGS)
    return path


def test_in_chromium_the_slider_position_sets_the_numbers_shown(page: Path) -> None:
    doms = {length: browse(page, f"#T={length}", "--dump-dom").stdout for length in LENGTHS}
    shown = {length: cells(dom) for length, dom in doms.items()}
    for length in LENGTHS:
        assert f"T = {length}" in doms[length]
        for row in measured_rows():
            if row.length == length:
                # the page prints 3 significant digits of ms and MiB, 3 of the error in exponent form
                assert float(shown[length][(row.method, "seconds")]) == pytest.approx(row.seconds * 1e3, rel=5e-3)
                assert float(shown[length][(row.method, "rel_error")]) == pytest.approx(row.rel_error, rel=5e-3)
                assert float(shown[length][(row.method, "peak_bytes")]) == pytest.approx(row.peak_bytes / 2**20,
                                                                                           rel=5e-3)
    assert shown[16] != shown[256]


def test_in_chromium_the_page_renders_and_the_picture_changes_with_the_slider(page: Path, tmp_path: Path) -> None:
    pictures = {}
    for length in (16, 256):
        shot = tmp_path / f"T{length}.png"
        browse(page, f"#T={length}", f"--screenshot={shot}", "--window-size=900,700")
        pictures[length] = read_png(shot)
    image = pictures[16]
    assert image.shape == (700, 900, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, bars and lines, not a blank page
    assert image.std() > 10
    changed = np.any(pictures[16] != pictures[256], axis=-1)
    assert changed.sum() > 1000  # other numbers, bars and marker
