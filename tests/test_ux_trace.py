"""Issue 17, item 7: untraceable models get one paragraph (no torch graph dumps) and a hint that
works: a --leaf that names a submodule holding the failing line, or, when the line is in the
root's own forward, what to do instead; a forward that needs several inputs is named as such."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixfx.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

ROOT_BRANCH = '''
import torch, torch.nn as nn
class Gate(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv2d(3, 3, 3)
    def forward(self, x):
        if x.mean() > 0:
            return self.c(x)
        return x
model = Gate()
INPUT_SHAPE = (1, 3, 16, 16)
'''

INNER_BRANCH = '''
import torch, torch.nn as nn
class Branchy(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv2d(3, 3, 3, padding=1)
    def forward(self, x):
        if x.mean() > 0:
            return self.c(x)
        return x
class Net(nn.Module):
    def __init__(self):
        super().__init__(); self.stem = nn.Conv2d(3, 3, 1); self.body = Branchy(); self.head = nn.Conv2d(3, 3, 1)
    def forward(self, x):
        return self.head(self.body(self.stem(x)))
model = Net()
INPUT_SHAPE = (1, 3, 16, 16)
'''

TWO_IMAGES = '''
import torch, torch.nn as nn
class Flow(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv2d(6, 2, 3, padding=1)
    def forward(self, image1, image2):
        return self.c(torch.cat([image1, image2], 1))
def build_model():
    return Flow()
'''


def test_root_branch_prints_one_paragraph_and_no_leaf_to_try(tmp_path):
    model = tmp_path / "gate.py"
    model.write_text(ROOT_BRANCH)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mixfx", "analyze", str(model)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 3
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("error: torch.fx could not trace Gate") and err.count("\n") == 0, err
    for dump in ("def forward", "torch.ops.aten", "Traceback"):
        assert dump not in err
    assert "no submodule to pass to --leaf" in err and "torch.where" in err
    assert "--leaf Gate" not in err


def test_inner_branch_hint_names_the_submodule_and_following_it_works(tmp_path):
    model = tmp_path / "inner.py"
    model.write_text(INNER_BRANCH)
    res = runner.invoke(app, ["analyze", str(model)])
    assert res.exit_code == 3
    assert "--leaf Branchy" in res.output
    res = runner.invoke(app, ["analyze", str(model), "--leaf", "Branchy", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["classification"] == "convolutional"


def test_a_forward_with_two_required_inputs_is_named(tmp_path):
    model = tmp_path / "flow.py"
    model.write_text(TWO_IMAGES)
    res = runner.invoke(app, ["analyze", str(model)])
    assert res.exit_code == 3, res.output
    assert "takes 2 required inputs (image1, image2)" in res.output
    assert "example_inputs()" in res.output and "tuple" in res.output
    # supplying them as the message says works
    model.write_text(TWO_IMAGES + "def example_inputs():\n    return torch.randn(1, 3, 32, 48), torch.randn(1, 3, 32, 48)\n")
    res = runner.invoke(app, ["analyze", str(model), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["input_shape"] == [1, 3, 32, 48]


def test_raft_small_is_named_as_a_two_image_model():
    pytest.importorskip("torchvision")
    res = runner.invoke(app, ["analyze", "torchvision:raft_small"])
    assert res.exit_code == 3, res.output
    assert "RAFT.forward takes 2 required inputs (image1, image2)" in res.output
    assert "control flow" not in res.output


def test_a_leaf_naming_the_root_is_explained(tmp_path):
    model = tmp_path / "gate.py"
    model.write_text(ROOT_BRANCH)
    res = runner.invoke(app, ["analyze", str(model), "--leaf", "Gate"])
    assert res.exit_code == 3
    assert "--leaf Gate names the top-level module itself, which cannot be a leaf" in res.output
