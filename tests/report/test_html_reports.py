"""The HTML reports: parse, one mark per data point in every plot, the embedded JSON is the data, nothing
fetched, at most 2 MB; and (where Debian's chromium is installed) they render in headless Chromium with no
console error and a non-blank screenshot."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

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
from _tiny_lm import write_tiny_lm
from _toy_encoder import RECIPE, toy_encoder, toy_sentences
from modelpress.evaluate import llm


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
REQUIRE = "MODELPRESS_REQUIRE_CHROMIUM"  # set by .ci/run, which installs Debian's chromium: no browser is a failure
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0")


def browser(found: str | None, profile) -> list[str]:
    """The browser's command line with a fresh profile; a skip without a browser, a failure if CI requires one."""
    if found is None:
        message = "chromium is not installed (Debian: apt-get install -y --no-install-recommends chromium)"
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{message}, and {REQUIRE}=1 says this run must have it (.ci/run installs it)")
        pytest.skip(f"{message}; the report's browser test needs it")
    return [found, *FLAGS, "--user-data-dir=" + str(profile)]


@pytest.fixture
def chromium(tmp_path):
    return browser(CHROMIUM, tmp_path / "profile")


def test_a_missing_browser_fails_where_ci_requires_one(monkeypatch, tmp_path):
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="must have it"):
        browser(None, tmp_path)
    monkeypatch.delenv(REQUIRE)
    with pytest.raises(pytest.skip.Exception):
        browser(None, tmp_path)
    assert browser("/usr/bin/chromium", tmp_path)[-1] == f"--user-data-dir={tmp_path}"
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert f"export {REQUIRE}=1" in ci and "apt-get install" in ci and ci.rstrip().endswith("make test")


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


def screenshot(flags: list[str], page, shot, size: tuple[int, int]) -> tuple[int, int, bytes]:
    run = subprocess.run([*flags, f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert not re.search(r"CONSOLE|Uncaught|Refused to", run.stderr), run.stderr[-2000:]
    return png_pixels(shot.read_bytes())


def plot_page(html: str, plot_id: str, marks: bool) -> str:
    """A page with the report's style and the one plot `plot_id`; without `marks`, its point marks are hidden."""
    style = re.search(r"<style>.*?</style>", html, re.S).group(0)
    svg = re.search(r'<svg [^>]*id="' + re.escape(plot_id) + r'".*?</svg>', html, re.S).group(0)
    hide = "" if marks else "<style>.pt{visibility:hidden}</style>"
    return f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{style}{hide}</head><body>{svg}</body></html>"


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(search_run, tmp_path, chromium):
    _, data = search_run
    html = search_report_html(data)
    page = tmp_path / "report.html"
    page.write_text(html)
    dom = subprocess.run([*chromium, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not re.search(r"CONSOLE|Uncaught|Refused to", dom.stderr), dom.stderr[-2000:]
    rendered = Plots()
    rendered.feed(dom.stdout)
    assert rendered.points == expected_points(data)  # every plot is in the DOM Chromium built, with every point
    width, height, pixels = screenshot(chromium, page, tmp_path / "shot.png", (1200, 2400))
    assert (width, height) == (1200, 2400)
    assert len(set(pixels[i] for i in range(0, len(pixels), 97))) > 20  # not a blank page: plots drew colours
    # Every plot on its own, with and without its point marks: the marks must change the rendered pixels.
    for plot_id in expected_points(data):
        shots = []
        for marks in (True, False):
            alone = tmp_path / f"{plot_id}-{marks}.html"
            alone.write_text(plot_page(html, plot_id, marks))
            shots.append(screenshot(chromium, alone, tmp_path / f"{plot_id}-{marks}.png", (800, 500))[2])
        changed = sum(a != b for a, b in zip(shots[0], shots[1]))
        assert changed > 50, f"{plot_id}: its {expected_points(data)[plot_id]} marks drew nothing ({changed} bytes)"


# --------------------------------------------------------------------------------- compress --eval --report

def test_compress_eval_writes_the_checkpoint_report_with_its_evaluation(tmp_path, monkeypatch, capsys):
    real = llm.evaluate_causal_lm
    monkeypatch.setattr("modelpress.cli.model_cmds.evaluate_causal_lm", lambda *a, **k: real(
        *a, **{**k, "window": 64, "prompts": ["the store"], "new_tokens": 4}))  # the shape is under test
    source = write_tiny_lm("llama", tmp_path / "llama")
    out, page, js = tmp_path / "q", tmp_path / "report.html", tmp_path / "eval.json"
    assert main(["compress", str(source), "--recipe", "int4", "--out", str(out), "--eval", "--windows", "2",
                 "--json", str(js), "--report", str(page)]) == 0
    assert f"report: {page}" in capsys.readouterr().out
    html = page.read_text()
    p = parsed(html)
    body = json.loads(p.json_text)
    evaluation = json.loads(js.read_text())
    assert body["evaluation"] == evaluation  # the JSON behind the page holds the evaluation --json wrote
    assert p.points["plot-kinds"] == len(body["by_kind"]) and sum(body["by_kind"].values()) == body["bytes"]
    assert "Evaluation against the original" in html
    ppl = f"{evaluation['candidate']['perplexity']:.3f}"
    assert re.search(r"<td>perplexity \(heldout, 2 x 64 tokens\)</td><td>[0-9.]+</td><td>" + re.escape(ppl), html)

    # Without --eval: the checkpoint's report alone.
    assert main(["compress", str(source), "--recipe", "int4", "--out", str(tmp_path / "q2"),
                 "--report", str(tmp_path / "plain.html")]) == 0
    plain = (tmp_path / "plain.html").read_text()
    assert "evaluation" not in json.loads(parsed(plain).json_text) and "Evaluation against" not in plain
    # A report path inside the output folder is refused before any work.
    assert main(["compress", str(source), "--recipe", "int4", "--out", str(tmp_path / "q3"),
                 "--report", str(tmp_path / "q3" / "r.html")]) == 2
