"""Issue 17, item 3: a verification on identically-zero outputs is never `passed` as it stands.

timm zero-initialises the classifier of Mixer/ResMLP-style models: both outputs are all zeros and
any rewrite would "pass". The check is made on copies with those zero parameters drawn at random
(the same values in both), so a wrong rewrite upstream of the zero head is caught.
"""
from __future__ import annotations

import json
import sys

import torch
from torch import nn
from typer.testing import CliRunner

from mixfx.cli import app
from mixfx.verify import verify

runner = CliRunner()

ZERO_HEAD = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)


class TinyMixer(nn.Module):
    """Patch stem, a channel MLP on tokens, mean pool, a zero-initialised head (as timm does)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def build_model():
    torch.manual_seed(0)
    return TinyMixer()
'''


def model_file(tmp_path):
    path = tmp_path / "zero_head.py"
    path.write_text(ZERO_HEAD)
    return path


def test_zero_head_is_verified_on_random_draws_and_passes(tmp_path):
    out = tmp_path / "out.pt"
    res = runner.invoke(app, ["rewrite", str(model_file(tmp_path)), "--to", "conv", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    v = json.loads(res.stdout)["verification"]
    assert v["passed"] and not v["degenerate"]
    assert v["randomised"] == ["head.weight", "head.bias"]
    assert all(s["ref_scale"] > 0.01 for s in v["sizes"])  # the compared outputs are not zero
    assert out.exists()
    text = runner.invoke(app, ["rewrite", str(model_file(tmp_path)), "--to", "conv"]).output
    assert "drawn at random" in text


def test_a_wrong_rewrite_behind_a_zero_head_is_caught(tmp_path, monkeypatch):
    rw = sys.modules["mixfx.rewrite"]
    from passes.base import RewritePassResult
    from passes.linear_to_conv import LinearToConv

    class Wrong(LinearToConv):  # a pass that breaks fc1: invisible through the all-zero head
        def call(self, gm):
            r = super().call(gm)
            with torch.no_grad():
                gm.get_submodule("fc1").bias.add_(1.0)
            return RewritePassResult(gm, True, r.changes, r.skipped)

    monkeypatch.setattr(rw, "default_passes", lambda to, only=None: [Wrong()])
    out = tmp_path / "bad.pt"
    res = runner.invoke(app, ["rewrite", str(model_file(tmp_path)), "--to", "conv", "-o", str(out)])
    assert res.exit_code == 4, res.output
    assert "not equivalent" in res.output and not out.exists()


def test_zero_outputs_without_a_zero_parameter_are_not_passed():
    class Zero(nn.Module):  # the output is zero by construction: nothing to draw at random
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.c(x) * 0.0

    m = Zero().eval()
    v = verify(m, m, torch.randn(1, 3, 8, 8))
    assert not v.passed and v.unproven and "nothing" in v.unproven
    assert v.sizes and all(s.ref_scale == 0 for s in v.sizes)  # the all-zero comparison it could not use


def test_zero_parameters_without_a_counterpart_are_not_passed():
    a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)).eval()
    nn.init.zeros_(a[1].weight)
    nn.init.zeros_(a[1].bias)
    b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Conv2d(4, 2, 1))).eval()  # other names
    b.load_state_dict({k.replace("1.", "1.0."): v for k, v in a.state_dict().items()})
    v = verify(a, b, torch.randn(1, 3, 8, 8))
    assert not v.passed and "counterpart" in v.unproven
