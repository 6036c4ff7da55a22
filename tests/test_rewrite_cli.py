"""`mixfx rewrite`: tables, JSON, writing, refusals and exit codes (in-process CliRunner)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mixfx.cli import app  # noqa: E402

MODEL = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 24)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(torch.relu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


def build_model():
    torch.manual_seed(0)
    return Net()
'''


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL)
    return path


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["rewrite", *map(str, args)])


def test_tables_and_nothing_written(model_file, tmp_path):
    res = invoke(model_file, "--to", "conv")
    assert res.exit_code == 0, res.output
    # fc1 and fc2 are one line (alike changes are grouped; --json lists each)
    for text in ("Changes", "fc*", "Conv2d", "Verification", "1x3x16x24", "Analysis verdict", "nothing written"):
        assert text in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.py"]


def test_json_and_output(model_file, tmp_path):
    out = tmp_path / "net_conv.pt"
    res = invoke(model_file, "--to", "conv", "--json", "-o", out)
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["verification"]["passed"] and d["written"] == str(out)
    assert d["classification_before"] == d["classification_after"]
    assert {c["module"] for c in d["changes"] if c["pass_name"] == "linear_to_conv"} == {"fc1", "fc2"}
    gm = torch.load(out, weights_only=False)
    assert isinstance(gm.get_submodule("fc1"), torch.nn.Conv2d)
    # and back, from the saved .pt
    res = invoke(out, "--to", "linear", "--only", "dense", "--input", "1x3x16x24", "--trust", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert {c["module"] for c in d["changes"] if c["pass_name"] == "conv_to_linear"} == {"fc1", "fc2"}
    assert any(s["module"] == "stem" and "3x3" in s["reason"] for s in d["skipped"])


def test_refuses_to_write_over_input(model_file):
    before = model_file.read_text()
    res = invoke(model_file, "--to", "conv", "-o", model_file)
    assert res.exit_code == 5
    assert model_file.read_text() == before


def test_usage_errors(model_file):
    assert invoke(model_file, "--to", "transformer").exit_code == 2
    assert invoke(model_file, "--to", "conv", "--format", "zip").exit_code == 2
    assert invoke(model_file).exit_code == 2  # --to is required


def test_failed_verification_exits_4_and_writes_nothing(model_file, tmp_path, monkeypatch):
    rw = sys.modules["mixfx.rewrite"]  # `mixfx.rewrite` the attribute is the function
    from passes.base import RewritePassResult
    from passes.linear_to_conv import LinearToConv

    class Wrong(LinearToConv):
        def call(self, gm):
            r = super().call(gm)
            with torch.no_grad():
                gm.get_submodule("fc1").bias.add_(1.0)
            return RewritePassResult(gm, True, r.changes, r.skipped)

    monkeypatch.setattr(rw, "default_passes", lambda to, only=None: [Wrong()])
    out = tmp_path / "bad.pt"
    res = invoke(model_file, "--to", "conv", "-o", out)
    assert res.exit_code == 4, res.output
    assert "not equivalent" in res.output and "FAILED" in res.output
    assert not out.exists()


def test_folder_output(model_file, tmp_path):
    out = tmp_path / "net_folder"
    res = invoke(model_file, "--to", "conv", "--format", "folder", "-o", out)
    assert res.exit_code == 0, res.output
    assert (out / "module.py").exists() and (out / "state_dict.pt").exists()


def test_layout_changes_read_as_one_group_with_the_permutes_left(model_file, tmp_path):
    """The permute pairs cancelled, what they were around and the ops now on channels: a count
    line and its indented lines, the pass's "permutes in the graph" count folded into it (not a
    note of its own), and `wrote X.pt` without a `(pt)` that repeats the suffix."""
    out = tmp_path / "net_conv.pt"
    res = invoke(model_file, "--to", "conv", "-o", out)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    head = next(i for i, line in enumerate(lines) if "permute pairs cancelled" in line)
    assert lines[head].split() == ["2", "layout", "permute", "pairs", "cancelled;", "permutes", "in", "the",
                                   "graph", "6", "->", "0"]
    assert lines[head + 1] == "      around LayerNorm x1, relu x1"
    assert lines[head + 2] == "      now LayerNorm -> ChannelLayerNorm"
    assert not any(line.startswith("note: layout") for line in lines)
    assert lines[-1] == f"wrote {out}"
    assert max(len(line) for line in lines[:-1]) <= 80  # (the last holds a long temporary path)
