"""Issue 17, items 5 and 6: output at 80 columns and through pipes, help, --version, lazy imports,
exit codes (closed pipe, bad --input)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixfx.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

SMALL = "import torch.nn as nn\nINPUT_SHAPE = (1, 3, 16, 16)\nmodel = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))\n"


def mixfx(*args: str, columns: int | None = 80, stdin=None, **kw) -> subprocess.CompletedProcess:
    """`mixfx ARGS` in a fresh interpreter, stdout a pipe (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "mixfx", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, **kw)


# ------------------------------------------------------------------------------- item 5: help
def test_help_reads_at_80_columns():
    proc = mixfx("analyze", "--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert re.search(r"Usage: .* analyze \[OPTIONS\] SPEC$", lines[0]), lines[0]
    for noise in ("{spec}", "<bool>", "<str>", "╭"):
        assert noise not in proc.stdout
    option = next(line for line in lines if line.lstrip().startswith("--entry"))
    assert len(option.split("  ")[-1]) > 30  # the description column is wide enough to read


def test_rewrite_help_lists_every_target_and_patchify():
    from mixfx.rewrite import TARGETS

    proc = mixfx("rewrite", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "patchify" in text
    to_help = text[text.index("--to TARGET"):text.index("-o, --output")]
    for target in TARGETS:
        assert f"{target}:" in to_help or f" {target}" in to_help, (target, to_help)


def test_version_and_help_do_not_import_torch():
    from mixfx import __version__

    code = ("import sys\nfrom mixfx.cli import main\nsys.argv = ['mixfx', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for flag, needle in (("--version", f"mixfx {__version__}"), ("--help", "Commands:")):
        proc = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, env=env, timeout=60)
        assert needle in proc.stdout, proc.stdout + proc.stderr
        assert proc.stdout.strip().endswith("no torch"), proc.stdout


# --------------------------------------------------------------------- item 5: 80 columns, pipes
def test_rewrite_output_piped_groups_changes_one_line_each():
    proc = mixfx("rewrite", "examples/convnext_block.py", "--to", "conv", columns=None)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    # the changes run up to the first note or, with none, the verification
    end = next(l for l in lines if l.startswith(("note:", "Verification")))
    changes = lines[lines.index("Changes (23)") + 1:lines.index(end)]
    assert len(changes) <= 12, changes  # 23 changes in 6 kinds, not 150 lines
    assert any("8  linear_to_conv  Linear -> Conv2d 1x1" in l for l in changes)
    assert "stages.*.blocks.*.mlp.fc*" in proc.stdout
    # no module path cut in two: every dotted name in the text is whole
    for token in re.findall(r"[\w*]+(?:\.[\w*]+)+", proc.stdout):
        assert not token.endswith("."), token


def test_where_polymorphism_breaks_keeps_its_indent(example_path):
    res = runner.invoke(app, ["analyze", example_path("mlp_mixer")], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    start = lines.index("Where polymorphism breaks")
    section = []
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break
        section.append(line)
    assert len(section) >= 4  # the node, its reason over 2+ lines, its cure
    assert all(line.startswith((" 1. ", "    ")) for line in section), section


# --------------------------------------------------------------------------- item 6: exit codes
def test_closed_pipe_is_not_a_failed_check(tmp_path):
    model = tmp_path / "small.py"
    model.write_text(SMALL)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixfx", "analyze", str(model), "--nodes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    proc.stdout.close()  # `| head -0`: the reader is gone before anything is written
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_closed_pipe_on_help_is_not_a_failed_check():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mixfx", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err


def test_input_with_too_few_sizes_is_a_usage_error(tmp_path):
    model = tmp_path / "small.py"
    model.write_text(SMALL)
    res = runner.invoke(app, ["analyze", str(model), "--input", "3x224"])
    assert res.exit_code == 2, res.output
    assert "has 2 sizes" in res.output and "1x3x224x224" in res.output


def test_input_with_a_zero_says_zero_is_the_problem(tmp_path):
    model = tmp_path / "small.py"
    model.write_text(SMALL)
    res = runner.invoke(app, ["analyze", str(model), "--input", "1x3x0x224"])
    assert res.exit_code == 2, res.output
    assert "size 3 is 0" in res.output and "at least 1" in res.output


def test_nodes_table_fits_80_columns(example_path):
    res = runner.invoke(app, ["analyze", example_path("vit_fixed_pos"), "--nodes"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    row = next(line for line in lines if " blocks.1.mlp.fc2 " in line)  # whole, on one line
    assert "Linear" in row and "spatial" in row
