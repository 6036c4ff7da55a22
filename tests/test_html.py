"""`mixfx analyze --html`: the page is self-contained, coloured by status, folded, and works in a
real browser (headless Chromium from Debian's packages, driven by Playwright; skipped without one)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixfx.html import (RIGID_COLOUR, STATUS_FILL, fold, group_keys, render_html, render_rewrite_html,
                        rigid_path, worst_status, write_html, write_rewrite_html)
from mixfx.report import NodeInfo

RIGID = "blocks_0_mlp_tokens_fc1"


def _rgb(hex_colour: str) -> str:
    h = hex_colour.lstrip("#")
    return "rgb({}, {}, {})".format(*(int(h[i:i + 2], 16) for i in (0, 2, 4)))


def _classes_of(page: str, name: str) -> set[str]:
    m = re.search(r'<g class="([^"]*)" data-node="%s"' % re.escape(name), page)
    assert m, f"no element for node {name}"
    return set(m.group(1).split())


# ----------------------------------------------------------------------------- without a browser
def test_mixer_page_is_self_contained_and_marks_the_rigid_node(example_report):
    page = render_html(example_report("mlp_mixer"))
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    assert {"node", "status-rigid", "on-rigid-path"} <= _classes_of(page, RIGID)
    assert "status-head" in _classes_of(page, "mean")
    assert "on-rigid-path" not in _classes_of(page, "head")
    assert "(H//16)*(W//16) == 196" in page  # the reason travels with the page
    assert "(H//16)*(W//16) == 196" in page  # input constraints (a fixed model: its pin) at the top
    assert page.index("input constraints") < page.index("<svg")


def test_mixer_folds_blocks_and_expands_the_rigid_one(example_report):
    report = example_report("mlp_mixer")
    items = {it.key: it for it in fold(report.nodes)}
    assert items["blocks.0"].status == "rigid" and items["blocks.1"].status == "spatial"
    page = render_html(report)
    assert re.search(r'class="item block status-rigid on-rigid-path expanded" data-block="blocks.0"', page)
    assert re.search(r'class="item block status-spatial" data-block="blocks.1"', page)


def test_rigid_path_runs_from_the_input_to_the_first_rigid_node(example_report):
    path = rigid_path(example_report("mlp_mixer"))
    assert {"x", "stem_proj", "blocks_0_norm1", RIGID} <= path
    assert not path & {"blocks_0_mlp_tokens_act", "add", "head", "blocks_1_norm1"}


def test_convolutional_example_has_no_rigid_node(example_report):
    report = example_report("resnet_cnn")
    page = render_html(report)
    drawn = re.findall(r'<g class="([^"]*)" data-(?:node|block)=', page)
    assert len(drawn) >= len(report.nodes)
    assert not [c for c in drawn if "status-rigid" in c or "on-rigid-path" in c]
    assert "status-head" in _classes_of(page, report.head.node)


def test_worst_status_and_grouping():
    assert worst_status(["spatial", "static", "head"]) == "head"
    assert worst_status(["spatial", "guarded", "rigid"]) == "rigid"
    assert worst_status(["static", "spatial"]) == "spatial"
    mods = ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.downsample.0", "layer1.0.downsample.1",
            "stages.1.blocks.0.conv_dw", "stages.1.blocks.0.norm", "stages.1.blocks.0.mlp.fc1", None]
    nodes = [NodeInfo(f"n{i}", "op", m, None, "spatial") for i, m in enumerate(mods)]
    assert group_keys(nodes) == ["layer1.0"] * 4 + ["stages.1.blocks.0"] * 3 + [None]


def test_write_html_is_atomic(example_report, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    write_html(example_report("mlp_mixer"), out)
    first = out.read_text()
    assert first.startswith("<!DOCTYPE html>") and os.stat(out).st_mode & 0o044
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        write_html(example_report("resnet_cnn"), out)
    assert out.read_text() == first
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_cli_writes_the_page(example_path, tmp_path):
    from mixfx.cli import app

    out = tmp_path / "m.html"
    res = CliRunner().invoke(app, ["analyze", example_path("mlp_mixer"), "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert f'data-node="{RIGID}"' in out.read_text()


def test_rewrite_diff_page(example_path, tmp_path):
    from mixfx import analyze, load_model
    from mixfx.rewrite import rewrite

    loaded = load_model(example_path("convnext_block"))
    result = rewrite(loaded.module, "conv", loaded.example_input)
    before = analyze(loaded.module, loaded.example_input)
    after = analyze(result.module, loaded.example_input)
    assert result.changes
    out = tmp_path / "diff.html"
    write_rewrite_html(before, after, result.changes, out)
    page = out.read_text()
    assert 'id="before"' in page and 'id="after"' in page
    change = result.changes[0]
    assert change.module in page and "changed" in _classes_of(page, change.node)
    assert "http://" not in page and "https://" not in page
    same = render_rewrite_html(before, before, [])
    assert not [c for c in re.findall(r'<g class="([^"]*)" data-', same) if "changed" in c.split()]


@pytest.mark.parametrize("name", ["resnet50", "vit_base_patch16_224"])
def test_timm_graphs_fold_to_a_readable_size(name):
    pytest.importorskip("timm")
    from mixfx import analyze, load_model

    loaded = load_model(f"timm:{name}", meta=True)
    report = analyze(loaded.module, loaded.example_input, name=loaded.name)
    items = fold(report.nodes)
    assert len(report.nodes) > 150 and len(items) <= 40
    assert sum(it.is_block for it in items) >= 12
    assert "http" not in render_html(report)


# ----------------------------------------------------------------------------- in a real browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).exists():
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium installed (Debian: apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright not installed (pip install playwright; its own browser download is not needed)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, report, tmp_path: Path, name: str):
    out = tmp_path / f"{name}.html"
    write_html(report, out)
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: r.url.startswith("file://") or errors.append(f"network: {r.url}"))
    page.goto(out.as_uri())
    return page, errors


def test_mixer_in_browser(browser, example_report, tmp_path):
    report = example_report("mlp_mixer")
    page, errors = _open(browser, report, tmp_path, "mixer")
    node = page.locator(f'[data-node="{RIGID}"]')
    assert node.is_visible()
    fill = node.locator("rect.box").evaluate("e => getComputedStyle(e).fill")
    assert fill == _rgb(RIGID_COLOUR)
    node.click()
    details = page.locator("#details").inner_text()
    assert "blocks.0.mlp_tokens.fc1" in details
    assert report.rigid_nodes[0].reason in details
    # a folded block expands on click, and its nodes get laid out
    block = page.locator('[data-block="blocks.1"]')
    assert not page.locator('[data-node="blocks_1_mlp_tokens_fc1"]').is_visible()
    block.locator(".collapsed-view").click()
    assert "expanded" in block.get_attribute("class")
    assert page.locator('[data-node="blocks_1_mlp_tokens_fc1"]').is_visible()
    page.screenshot(path=str(tmp_path / "mixer.png"), full_page=True)
    assert (tmp_path / "mixer.png").stat().st_size > 10_000
    assert errors == []


def test_resnet_in_browser(browser, example_report, tmp_path):
    report = example_report("resnet_cnn")
    page, errors = _open(browser, report, tmp_path, "resnet")
    assert page.locator("svg .status-rigid").count() == 0
    head = page.locator(f'[data-node="{report.head.node}"]')
    assert head.is_visible()
    assert head.locator("rect.box").evaluate("e => getComputedStyle(e).fill") == _rgb(STATUS_FILL["head"])
    head.click()
    assert "head" in page.locator("#details").inner_text()
    page.screenshot(path=str(tmp_path / "resnet.png"), full_page=True)
    assert errors == []
