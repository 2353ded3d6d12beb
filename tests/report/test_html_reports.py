"""The HTML reports: parse, one mark per data point in every plot, the embedded JSON is the data, nothing
fetched, at most 2 MB; and (where Debian's chromium is installed) they render in headless Chromium with no
console error and a non-blank screenshot."""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest
import torch

from modelpress.cli import main
from modelpress.compress import compress
from modelpress.formats.checkpoint import save
from modelpress.report import model_report_html, search_report_html, store_data, store_report_html
from modelpress.report.page import MAX_REPORT_BYTES
from modelpress.search.joint import Budget, joint_search
from modelpress.search.space import default_space
from modelpress.search.validate import make_executor
from modelpress.store import Store
from _toy_encoder import RECIPE, toy_encoder, toy_sentences


class Plots(HTMLParser):
    """Per <svg class="plot">: its id and how many marks with class "pt" it holds; plus the embedded JSON,
    and every attribute that could fetch something."""

    def __init__(self):
        super().__init__()
        self.points: dict[str, int] = {}
        self.current: str | None = None
        self.json_text: str | None = None
        self._in_json = False
        self.fetching: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.fetching += [(k, v) for k, v in attrs if k in ("src", "href", "xlink:href", "action")]
        if tag == "svg" and "plot" in (a.get("class") or ""):
            self.current = a["id"]
            self.points[self.current] = 0
        elif self.current and "pt" in (a.get("class") or "").split():
            self.points[self.current] += 1
        if tag == "script":
            assert a.get("type") == "application/json", "no script runs in a report"
            self._in_json = True

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None
        if tag == "script":
            self._in_json = False

    def handle_data(self, data):
        if self._in_json:
            self.json_text = (self.json_text or "") + data


def parsed(html: str) -> Plots:
    p = Plots()
    p.feed(html)
    p.close()
    assert not p.fetching, p.fetching
    assert "<script src" not in html and "@import" not in html and "url(" not in html
    assert len(html.encode()) <= MAX_REPORT_BYTES
    return p


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model, sentences = toy_encoder(), toy_sentences()
    run = tmp_path_factory.mktemp("report") / "run"
    budget = int(size_bytes(model) / 6)
    res = joint_search(model, "toy", sentences, default_space("joint"), Budget(total_bytes=budget), str(run),
                       lambda: make_executor("inline", toy_encoder, sentences, False, model=model), candidates=10)
    torch.set_num_threads(previous)
    return run, res.data


def size_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def expected_points(data) -> dict[str, int]:
    """Marks each plot must draw: a circle per candidate, a cell per measurement, a bar per layer, kind or bin."""
    chosen = next(p for p in data["candidates"] if p["id"] == data["chosen"])
    options = {o["label"]: o["pass"] for o in data["options"]}
    kinds = {(layer["kind"], options.get(chosen["choice"][layer["name"]], "float")) for layer in data["layers"]}
    return {"plot-front": len(data["candidates"]), "plot-latency": len(data["candidates"]),
            "plot-sensitivity": sum(len(cells) for cells in data["table"].values()),
            "plot-layers": len(data["layers"]), "plot-fidelity": 20, "plot-kinds": len(kinds) + 1}


def test_search_report_has_every_plot_with_one_mark_per_point(search_run):
    _, data = search_run
    html = search_report_html(data)
    p = parsed(html)
    assert p.points == expected_points(data)
    assert json.loads(p.json_text) == json.loads(json.dumps(data))  # the JSON behind it, whole
    assert len(data["candidates"]) >= 8


def test_report_command_on_a_run_and_a_checkpoint(search_run, tmp_path, capsys):
    run, data = search_run
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert parsed(out.read_text()).points["plot-front"] == len(data["candidates"])
    model = compress(toy_encoder(), RECIPE)
    path = save(model, tmp_path / "ckpt", RECIPE)
    html = model_report_html(path, skeleton=toy_encoder())
    p = parsed(html)
    body = json.loads(p.json_text)
    assert p.points["plot-kinds"] == len(body["by_kind"]) == 2  # int4 codes and float32 norms/biases
    assert p.points["plot-layers"] == min(60, len(body["layers"]))
    assert sum(body["by_kind"].values()) == body["bytes"]


def test_store_report_counts_versions_and_bytes_added(tmp_path):
    base = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(1024)}
    changed = {**base, "b": torch.zeros(1024)}
    with Store.init(tmp_path / "store") as store:
        first = store.put(base, "m", message="first")
        second = store.put(changed, "m", message="second")
        whole, added = store.stored_bytes("m", second), store.stored_bytes("m", second, exclusive_of=first)
    data = store_data(tmp_path / "store")
    (model,) = data["models"]
    assert [v["id"] for v in model["versions"]] == [first, second]
    assert model["versions"][1]["parent"] == first and model["versions"][1]["added_bytes"] == added < whole
    assert model["dedup_ratio"] == pytest.approx((store_bytes := model["logical_bytes"]) / model["added_bytes"])
    assert store_bytes > model["added_bytes"]
    p = parsed(store_report_html(tmp_path / "store"))
    assert p.points["plot-added"] == 2


# --------------------------------------------------------------------------------- headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y "
                                                             "chromium); the report's browser test needs it")


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, filtered scanlines) of a PNG, read with zlib alone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.mark.slow
@needs_chromium
def test_the_report_renders_in_headless_chromium(search_run, tmp_path):
    _, data = search_run
    page = tmp_path / "report.html"
    page.write_text(search_report_html(data))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not re.search(r"CONSOLE|Uncaught|Refused to", dom.stderr), dom.stderr[-2000:]
    rendered = Plots()
    rendered.feed(dom.stdout)
    assert rendered.points == expected_points(data)  # every plot is in the DOM Chromium built, with every point
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 2400)
    assert len(set(pixels[i] for i in range(0, len(pixels), 97))) > 20  # not a blank page: plots drew colours
