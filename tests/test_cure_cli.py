"""`mixfx rewrite SPEC --to polymorphic`: before/after verdicts, changes, writing, refusal (exit 4)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typer.testing import CliRunner  # noqa: E402

from mixfx.cli import app  # noqa: E402

MODEL = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


class Net(nn.Module):
    def __init__(self, mix_tokens=False):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 64, 8))
        self.tokens = nn.Linear(64, 64) if mix_tokens else None
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        torch._assert(x.shape[2] == 32, "expects 32x32")
        t = self.proj(x).flatten(2).transpose(1, 2) + self.pos
        if self.tokens is not None:
            t = self.tokens(t.transpose(1, 2)).transpose(1, 2)
        return self.head(t.mean(1))


def build_model():
    torch.manual_seed(0)
    return Net(MIX)
'''

runner = CliRunner()


def _write(tmp_path, mix: bool) -> Path:
    path = tmp_path / ("mixer.py" if mix else "vit.py")
    path.write_text(MODEL.replace("MIX", str(mix)))
    return path


def test_cure_shows_verdicts_and_changes_and_writes(tmp_path):
    out = tmp_path / "cured.pt"
    res = runner.invoke(app, ["rewrite", str(_write(tmp_path, False)), "--to", "polymorphic", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "before" in res.output and "fixed" in res.output and "cured: fixed -> convolutional" in res.output
    assert "dropped" in res.output and "resampled" in res.output
    assert "runs" in res.output and out.exists()
    cured = torch.load(out, weights_only=False)
    assert cured(torch.randn(1, 3, 48, 40)).shape == (1, 10)


def test_cure_json(tmp_path):
    res = runner.invoke(app, ["rewrite", str(_write(tmp_path, False)), "--to", "polymorphic", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["target"] == "polymorphic" and data["classification_before"] == "fixed"
    assert data["classification_after"] in ("convolutional", "polymorphic")
    assert {c["node"] for c in data["changes"]} >= {"_assert"}


def test_refusal_exits_4_and_writes_nothing(tmp_path):
    out = tmp_path / "cured.pt"
    res = runner.invoke(app, ["rewrite", str(_write(tmp_path, True)), "--to", "polymorphic", "-o", str(out)])
    assert res.exit_code == 4
    assert "tokens" in res.output and "token mixing" in res.output
    assert not out.exists()
