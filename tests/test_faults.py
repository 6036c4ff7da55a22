"""Fault injection for rewrites: whatever fails (a pass, verification, the disk, Ctrl-C), the user's
files stay byte-identical and no output or temporary file is left behind."""
from __future__ import annotations

import errno
import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import mixfx.saving
from mixfx.cli import app

runner = CliRunner()

MODEL = textwrap.dedent("""
    import torch.nn as nn
    INPUT_SHAPE = (1, 3, 8, 8)
    def build_model():
        return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
""")


@pytest.fixture()
def workdir(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)), tmp_path / "model.pt")
    (tmp_path / "out.pt").write_bytes(b"previous output")  # an existing output must survive a failure too
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "module.py").write_text("# previous folder output\n")
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def invoke(workdir: Path, spec: str, out: str, fmt: str = "pt", *extra: str):
    return runner.invoke(app, ["rewrite", str(workdir / spec), "--to", "linear", "-o", str(workdir / out),
                               "--format", fmt, "--trust", *extra])


def assert_untouched(workdir: Path, before: dict[str, bytes], res, code: int) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert snapshot(workdir) == before  # same files, same bytes: no output, no temp file, inputs intact


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


SPECS = ["model.py", "model.pt"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("which", ["conv_to_linear", "layout"])
def test_pass_raises(workdir, monkeypatch, spec, which):
    from passes.conv_to_linear import ConvToLinear
    from passes.layout import LayoutCleanup

    cls = ConvToLinear if which == "conv_to_linear" else LayoutCleanup
    monkeypatch.setattr(cls, "call", _raise(RuntimeError("injected")))
    before = snapshot(workdir)
    res = invoke(workdir, spec, "out.pt")
    assert_untouched(workdir, before, res, 4)
    assert "injected" in res.output


@pytest.mark.parametrize("spec", SPECS)
def test_verification_fails(workdir, monkeypatch, spec):
    import importlib

    rewrite_mod = importlib.import_module("mixfx.rewrite")  # `mixfx.rewrite` the attribute is the function
    real = rewrite_mod.verify

    def failing(*a, **k):
        v = real(*a, **k)
        v.passed = False
        return v

    monkeypatch.setattr(rewrite_mod, "verify", failing)
    before = snapshot(workdir)
    res = invoke(workdir, spec, "out.pt")
    assert_untouched(workdir, before, res, 4)


@pytest.mark.parametrize("fault, code", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 5),
    (OSError(errno.EIO, os.strerror(errno.EIO)), 5),
    (KeyboardInterrupt(), 130),
])
@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
def test_pt_write_faults(workdir, monkeypatch, fault, code, where):
    if where == "torch.save":
        def save(obj, f, *a, **k):
            Path(f).write_bytes(b"partial")  # what a write cut short leaves
            raise fault
        monkeypatch.setattr(mixfx.saving.torch, "save", save)
    else:
        monkeypatch.setattr(mixfx.saving.os, "replace", _raise(fault))
    before = snapshot(workdir)
    res = invoke(workdir, "model.py", "out.pt")
    assert_untouched(workdir, before, res, code)


@pytest.mark.parametrize("fault, code", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 5),
    (KeyboardInterrupt(), 130),
])
@pytest.mark.parametrize("where", ["to_folder", "check", "first_replace", "second_replace"])
def test_folder_write_faults(workdir, monkeypatch, fault, code, where):
    """--format folder over an existing folder output: it is moved aside, then replaced."""
    if where == "to_folder":
        import torch.fx

        real = torch.fx.GraphModule.to_folder

        def to_folder(self, folder, name="FxModule"):
            real(self, folder, name)
            raise fault
        monkeypatch.setattr(torch.fx.GraphModule, "to_folder", to_folder)
    elif where == "check":
        monkeypatch.setattr(mixfx.saving, "check_folder", _raise(fault))
    else:
        real_replace = os.replace
        calls = {"n": 0}
        fail_at = 1 if where == "first_replace" else 2

        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise fault
            return real_replace(src, dst)
        monkeypatch.setattr(mixfx.saving.os, "replace", replace)
    before = snapshot(workdir)
    res = invoke(workdir, "model.py", "outdir", "folder")
    assert_untouched(workdir, before, res, code)


def test_no_fault_writes_output(workdir):
    """Control: without a fault the same command does write (so the tests above test something)."""
    before = snapshot(workdir)
    res = invoke(workdir, "model.py", "out.pt")
    assert res.exit_code == 0, res.output
    after = snapshot(workdir)
    assert after["out.pt"] != before["out.pt"]
    assert {k: v for k, v in after.items() if k != "out.pt"} == {k: v for k, v in before.items() if k != "out.pt"}


def test_a_swallowed_budget_signal_is_raised_again_at_the_next_check():
    """The budget's timer can land where its exception is swallowed (a weakref callback prints
    "Exception ignored in ..."); the run must still stop at the next node."""
    import time

    import pytest as _pytest

    from mixfx.shapes import SymbolicBudgetExceeded, time_budget

    with _pytest.raises(SymbolicBudgetExceeded):
        with time_budget(0.05) as budget:
            t0 = time.process_time()
            while time.process_time() - t0 < 0.5:
                try:
                    sum(range(10_000))
                except BaseException:  # noqa: BLE001 - what a weakref callback does to it
                    pass
            assert budget.expired
            budget.check()
