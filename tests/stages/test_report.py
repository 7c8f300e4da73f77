"""report: one self-contained HTML page per run, written by `labelpipe run`, checked in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium); the browser check is skipped"
)
pytestmark = pytest.mark.slow  # the shared full_run: ~30 s once per session


class Tables(HTMLParser):
    """Rows of every <table id=...>: {table id: [[cell text, ...], ...]}; and every <img> src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.current: str | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self.current = attrs["id"]
            self.tables[self.current] = []
        elif tag == "tr" and self.current:
            self.tables[self.current].append([])
        elif tag in ("td", "th") and self.current:
            self.cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.current:
            self.tables[self.current][-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def parse(html: str) -> Tables:
    parser = Tables()
    parser.feed(html)
    return parser


def test_run_writes_a_self_contained_report_with_every_model_side_by_side(full_run):
    html = (full_run / "report.html").read_text()  # written by `labelpipe run` at the end
    page = parse(html)
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html), "the report must load nothing from the network"
    assert page.images and all(src.startswith("data:image/") for src in page.images)

    stages = {row[0]: row[1] for row in page.tables["stages-table"][1:]}
    assert stages["pretrain"] == stages["selftrain/round-1/train"] == stages["evaluate/round-1"] == "done"

    metrics = page.tables["metrics-target_test"]
    assert metrics[0] == ["class", "pretrain", "round-1", "gain (round-1 - pretrain)"]
    rows = {row[0].replace(" (tail)", ""): row for row in metrics[1:]}
    assert len([r for r in rows if r.startswith("digit-")]) == 10
    before = json.loads((full_run / "evaluate/pretrain/metrics.json").read_text())
    after = json.loads((full_run / "evaluate/round-1/metrics.json").read_text())
    assert rows["mIoU"][1:] == [
        f"{100 * before['miou']:.1f}",
        f"{100 * after['miou']:.1f}",
        f"{100 * (after['miou'] - before['miou']):+.1f}",
    ]
    assert {"tail mIoU", "ECE", "pixel accuracy"} <= set(rows)
    assert html.count('class="overlay"') == 8  # the latest model on the first test images, as segment draws them
    for section in ('id="pseudolabels"', "round-1: pseudo-labels", 'class="curves"', 'id="config"', "seed: 0"):
        assert section in html, section


def test_report_command_takes_the_run_either_way(full_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert run_cli(["report", "--run", str(full_run), "--out", str(out)]) == 0
    assert run_cli(["report", str(full_run), "--out", str(tmp_path / "p.html")]) == 0
    assert out.stat().st_size > 50_000 and (tmp_path / "p.html").is_file()
    assert run_cli(["report", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def chromium(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@needs_chromium
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    url = (full_run / "report.html").resolve().as_uri()
    # The DOM after load, with the page's script run; at the screenshot's width, so the layout is the same.
    dom = chromium("--dump-dom", "--window-size=1280,1000", url).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert total >= 10 and loaded == total, f"{loaded} of {total} images decoded in the browser"
    page = parse(dom)
    assert len(page.tables["metrics-target_test"]) == 1 + 11 + 4 + 1  # header, classes, summaries, images
    assert [row[0] for row in page.tables["stages-table"][1:]].count("pretrain") == 1

    # Where the browser laid out the first training curves, the screenshot must show a figure.
    left, top, width, height = (float(v) for v in re.search(r'data-curves-box="([^"]+)"', body).group(1).split(","))
    assert width > 300 and height > 50
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", f"--window-size=1280,{int(top + height) + 50}", url)
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape[0] >= top + height
    curves = pixels[int(top) : int(top + height), int(left) : int(left + width)]
    assert curves.std() > 20, "the curves area of the screenshot is blank"
    assert (np.abs(curves - curves.mean((0, 1))).sum(2) > 100).mean() > 0.01  # lines in colour on white
    heading = pixels[:60]  # the page title in dark text at the top
    assert (heading.mean(2) < 100).mean() > 0.002
