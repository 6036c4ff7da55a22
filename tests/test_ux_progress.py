"""Issue 17, item 8: progress on stderr when it is a terminal, nothing when piped or with --json."""
from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import mixfx
from mixfx import progress
from mixfx.cli import app

runner = CliRunner()

SMALL = ("import torch.nn as nn\nINPUT_SHAPE = (1, 3, 16, 16)\n"
         "model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(2))\n")


def test_library_stages_reach_the_reporter_and_nothing_by_default():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(2), torch.nn.Linear(64, 2))
    seen: list[str] = []
    with progress.reporting(seen.append):
        mixfx.rewrite(model, "conv", torch.randn(1, 3, 8, 8), analyze=False)
    assert "tracing with torch.fx" in seen
    assert any(s.startswith("rewrite pass ") for s in seen)
    assert "verifying at 1x3x8x8" in seen
    progress.stage("outside any reporter")  # a no-op, never an error


@pytest.fixture()
def terminal_stderr(monkeypatch):
    import sys

    cli_app = sys.modules["mixfx.cli.app"]  # `mixfx.cli.app` the attribute is the Typer app
    buf = io.StringIO()
    monkeypatch.setattr(cli_app, "err_console", Console(file=buf, force_terminal=True, width=80))
    return buf


def test_a_terminal_gets_a_spinner_with_the_stage(tmp_path, terminal_stderr):
    model = tmp_path / "small.py"
    model.write_text(SMALL)
    res = runner.invoke(app, ["analyze", str(model)])
    assert res.exit_code == 0, res.output
    shown = terminal_stderr.getvalue()
    for stage in ("loading", "analysing", "tracing with torch.fx"):  # each stage is drawn when it starts
        assert stage in shown, shown
    assert shown.endswith("\x1b[2K")  # transient: the line is erased at the end


def test_json_shows_no_progress_even_on_a_terminal(tmp_path, terminal_stderr):
    model = tmp_path / "small.py"
    model.write_text(SMALL)
    res = runner.invoke(app, ["analyze", str(model), "--json"])
    assert res.exit_code == 0, res.output
    assert terminal_stderr.getvalue() == ""


def test_piped_stderr_gets_no_progress(tmp_path):
    model = tmp_path / "small.py"
    model.write_text(SMALL)
    res = runner.invoke(app, ["analyze", str(model)])
    assert res.exit_code == 0
    for stage in ("loading", "analysing", "tracing"):
        assert stage not in res.stderr


def test_a_step_gives_the_screen_back_to_the_enclosing_stage():
    seen: list[str] = []
    with progress.reporting(seen.append):
        progress.stage("analysing")
        mixfx.trace(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 8, 8))
    assert seen[0] == "analysing" and "tracing with torch.fx" in seen
    assert seen[-1] == "analysing"  # not "tracing" for the rest of the analysis


ZERO_BY_CONSTRUCTION = '''
import torch, torch.nn as nn
INPUT_SHAPE = (1, 3, 8, 8)
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv2d(3, 4, 1); self.fc = nn.Linear(4, 4)
    def forward(self, x):
        return self.fc(self.c(x).permute(0, 2, 3, 1)) * 0.0
model = M()
'''


def test_report_printed_while_the_spinner_runs_stays_on_stdout(tmp_path, terminal_stderr):
    """A refused rewrite prints its tables inside the progress block: they must reach stdout."""
    model = tmp_path / "zero.py"
    model.write_text(ZERO_BY_CONSTRUCTION)
    res = runner.invoke(app, ["rewrite", str(model), "--to", "conv", "-o", str(tmp_path / "out.pt")])
    assert res.exit_code == 4, res.output
    assert "Verification" in res.stdout and "not proven" in res.stdout
    assert "Verification" not in terminal_stderr.getvalue()
    assert "could not be proven equivalent" in terminal_stderr.getvalue()  # the error paragraph
    assert not (tmp_path / "out.pt").exists()
