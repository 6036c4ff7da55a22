"""Issue 17, item 4: saved outputs (permissions, folder size and contents, the example shape kept
with the module) and a rewrite with nothing to rewrite."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mixfx.cli import app

runner = CliRunner()

FIXED_64 = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


class Fixed(nn.Module):
    """A conv stem, then a token-mixing Linear over the 16x16 grid: only 64x64 inputs run."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.tokens = nn.Linear(256, 256)
        self.encoder = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())  # pickled by to_folder
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x).flatten(2)                                  # [B, 8, 256]
        x = self.tokens(x).transpose(1, 2)                           # [B, 256, 8]
        return self.head(self.encoder(x).mean(1))


def build_model():
    torch.manual_seed(0)
    return Fixed()
'''

CONVS = "import torch.nn as nn\nINPUT_SHAPE = (1, 3, 16, 16)\nmodel = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))\n"


@pytest.fixture()
def fixed_file(tmp_path):
    path = tmp_path / "fixed.py"
    path.write_text(FIXED_64)
    return path


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_follow_the_umask(fixed_file, tmp_path, umask_022):
    pt, folder = tmp_path / "out.pt", tmp_path / "out_folder"
    assert runner.invoke(app, ["rewrite", str(fixed_file), "--to", "conv", "-o", str(pt)]).exit_code == 0
    res = runner.invoke(app, ["rewrite", str(fixed_file), "--to", "conv", "--format", "folder", "-o", str(folder)])
    assert res.exit_code == 0, res.output
    assert mode(pt) == 0o644
    assert mode(folder) == 0o755
    assert {mode(p) for p in folder.iterdir()} == {0o644}


def test_folder_holds_the_weights_once_and_no_cache(fixed_file, tmp_path):
    folder = tmp_path / "out_folder"
    res = runner.invoke(app, ["rewrite", str(fixed_file), "--to", "conv", "--format", "folder", "-o", str(folder)])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in folder.iterdir())
    assert "__pycache__" not in names and "encoder.pt" in names
    weights = (folder / "state_dict.pt").stat().st_size
    pickles = sum(p.stat().st_size for p in folder.glob("*.pt") if p.name != "state_dict.pt")
    n_bytes = sum(t.numel() * t.element_size() for t in torch.load(folder / "state_dict.pt").values())
    assert weights >= n_bytes and pickles < 0.5 * n_bytes, (weights, pickles, n_bytes)
    module_py = (folder / "module.py").read_text()
    assert max(len(line) for line in module_py.splitlines() if line.lstrip().startswith("#") or " # " in line) < 160
    assert "INPUT_SHAPE = (1, 3, 64, 64)" in module_py
    # loads as the README says (the folder is a package), and equals the original
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from out_folder import FxModule, INPUT_SHAPE; "
            "m = FxModule().eval(); torch.manual_seed(1); x = torch.randn(INPUT_SHAPE); "
            "torch.save((x, m(x).detach()), sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-B", "-c", code, str(tmp_path), str(tmp_path / "ran.pt")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from mixfx.loading import load_model

    x, y = torch.load(tmp_path / "ran.pt")
    original = load_model(str(fixed_file)).module
    with torch.no_grad():
        assert torch.allclose(original(x), y, atol=1e-5)


def test_a_rewritten_pt_is_analysed_at_its_own_size(fixed_file, tmp_path):
    pt = tmp_path / "out.pt"
    assert runner.invoke(app, ["rewrite", str(fixed_file), "--to", "conv", "-o", str(pt)]).exit_code == 0
    res = runner.invoke(app, ["analyze", str(pt), "--trust", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["input_shape"] == [1, 3, 64, 64]
    assert data["classification"] == "fixed"


def test_nothing_to_rewrite_says_so_and_writes_nothing(tmp_path):
    model = tmp_path / "convs.py"
    model.write_text(CONVS)
    out = tmp_path / "out.pt"
    res = runner.invoke(app, ["rewrite", str(model), "--to", "linear", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "nothing to rewrite" in res.output and "nothing written" in res.output
    assert "Skipped (2)" in res.output and "kernel 3x3" in res.output
    assert not out.exists()
    res = runner.invoke(app, ["rewrite", str(model), "--to", "linear", "-o", str(out), "--json"])
    data = json.loads(res.stdout)
    assert data["nothing_to_rewrite"] is True and data["written"] is None and not out.exists()


def test_a_saved_folder_is_analysed_at_its_own_size_with_trust(fixed_file, tmp_path):
    folder = tmp_path / "out_folder"
    res = runner.invoke(app, ["rewrite", str(fixed_file), "--to", "conv", "--format", "folder", "-o", str(folder)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["analyze", str(folder)])
    assert res.exit_code == 3 and "--trust" in res.output  # module.py unpickles: as for a .pt
    res = runner.invoke(app, ["analyze", str(folder), "--trust", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["input_shape"] == [1, 3, 64, 64] and data["classification"] == "fixed"
