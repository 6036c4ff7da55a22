"""`mixfx analyze` through typer's runner: output, JSON schema, --check and exit codes."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mixfx.cli import app

runner = CliRunner()

SCHEMA_KEYS = {
    "schema_version", "model", "input_shape", "tracer", "classification", "fully_convolutional", "summary",
    "rigid_nodes", "head", "global_mixing", "constraints", "output_shape", "outputs", "concrete_checks",
    "disagreements", "confirmed", "notes", "dropped_guards", "unknown_nodes", "nodes", "timings",
    "global_context", "receptive_field", "tileable",
}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_rich_summary_for_mixer(example_path):
    res = invoke("analyze", example_path("mlp_mixer"))
    assert res.exit_code == 0, res.output
    assert "fixed" in res.output
    assert "blocks.0.mlp_tokens.fc1" in res.output
    assert "(H//16)*(W//16) == 196" in res.output


def test_json_schema(example_path):
    res = invoke("analyze", example_path("vit_fixed_pos"), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == SCHEMA_KEYS
    assert data["schema_version"] == 1
    assert data["classification"] == "fixed"
    rigid = data["rigid_nodes"][0]
    assert set(rigid) == {"node", "module", "op", "kind", "reason", "condition", "cure", "source"}
    assert rigid["module"] == "pos_embed"
    assert set(data["head"]) == {"node", "module", "op"}
    node = data["nodes"][1]
    assert set(node) == {"name", "op", "module", "shape", "status", "depends_on", "inputs", "detail", "receptive_field"}
    check = data["concrete_checks"][0]
    assert set(check) == {"input_shape", "ok", "failed_node", "failed_module", "error", "failed_asserts",
                          "expected_ok", "agrees"}


def test_nodes_table(example_path):
    res = invoke("analyze", example_path("resnet_cnn"), "--nodes")
    assert res.exit_code == 0
    assert "ceil(H/4)" in res.output
    assert "layer1.conv1" in res.output


@pytest.mark.parametrize(
    "name,check,code",
    [("resnet_cnn", "convolutional", 0), ("mlp_mixer", "convolutional", 1), ("mlp_mixer", "fixed", 0),
     ("vit_interp_pos", "polymorphic", 0), ("fcn_segmentation", "fully-convolutional", 0),
     ("resnet_cnn", "fully-convolutional", 1)],
)
def test_check_exit_codes(example_path, name, check, code):
    res = invoke("analyze", example_path(name), "--check", check)
    assert res.exit_code == code, res.output


def test_bad_check_value_is_usage_error(example_path):
    res = invoke("analyze", example_path("resnet_cnn"), "--check", "round")
    assert res.exit_code == 2
    assert "not a class" in res.output


def test_input_override(example_path):
    res = invoke("analyze", example_path("resnet_cnn"), "--input", "1x3x160x192", "--json")
    assert json.loads(res.stdout)["input_shape"] == [1, 3, 160, 192]


def test_missing_file_is_exit_3_without_traceback(tmp_path):
    res = invoke("analyze", str(tmp_path / "nope.py"))
    assert res.exit_code == 3
    assert "No such file" in res.output
    assert "Traceback" not in res.output


def test_wrong_input_rank_is_exit_3(example_path):
    res = invoke("analyze", example_path("resnet_cnn"), "--input", "1x3x64")
    assert res.exit_code == 3
    assert "example input" in res.output and "--input" in res.output


def test_untraceable_control_flow_names_line_and_leaf(tmp_path):
    model = tmp_path / "branchy.py"
    model.write_text(
        "import torch, torch.nn as nn\n"
        "class Gate(nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return x * 2\n"
        "        return x\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = nn.Conv2d(3, 8, 3); self.gate = Gate()\n"
        "    def forward(self, x):\n"
        "        return self.gate(self.conv(x)).mean((2, 3))\n"
        "def build_model():\n"
        "    return Net()\n"
        "INPUT_SHAPE = (1, 3, 32, 32)\n")
    # neither fx nor torch.export can trace a branch on tensor values
    res = invoke("analyze", str(model))
    assert res.exit_code == 3, res.output
    assert "branchy.py:4" in res.output and "--leaf Gate" in res.output
    assert "Traceback" not in res.output
    # as a leaf the gate is one opaque node; its shapes come from a real forward
    res = invoke("analyze", str(model), "--leaf", "Gate", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["tracer"] == "fx"
    assert data["classification"] == "convolutional"
    assert data["unknown_nodes"] == ["gate"]
