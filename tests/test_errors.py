"""Every failure a user can meet (docs/errors.md): its exit code and its message, through the CLI.

Each row of the table in docs/errors.md has one test here, named after the row's id. Every test
also checks that no raw traceback reaches the user (only `--debug` shows one).
"""
from __future__ import annotations

import errno
import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mixfx.cli import app

runner = CliRunner()

CONV1X1 = """
    import torch.nn as nn
    INPUT_SHAPE = (1, 3, 8, 8)
    def build_model():
        return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
"""


def write(tmp_path: Path, name: str, src: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(src))
    return str(path)


def run(*args: str, code: int, needles: tuple[str, ...] = (), traceback_ok: bool = False):
    res = runner.invoke(app, [str(a) for a in args])
    out = res.output
    assert res.exit_code == code, f"exit {res.exit_code} != {code}\n{out}\n{res.exception!r}"
    for needle in needles:
        assert needle in out, f"{needle!r} not in output:\n{out}"
    if not traceback_ok:
        assert "Traceback" not in out, out
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


# ------------------------------------------------------------------------------- E01-E16: loading
def test_E01_missing_py_file(tmp_path):
    run("analyze", tmp_path / "nope.py", code=3, needles=("No such file", "nope.py"))


def test_E02_missing_pt_file(tmp_path):
    run("analyze", tmp_path / "nope.pt", code=3, needles=("No such file", "nope.pt"))


def test_E03_syntax_error(tmp_path):
    p = write(tmp_path, "syn.py", "import torch\ndef build_model(:\n    pass\n")
    run("analyze", p, code=3, needles=("syntax error at line 2",))


def test_E04_import_error_inside_model_file(tmp_path):
    p = write(tmp_path, "imp.py", "import nonexistent_pkg_xyz\n")
    run("analyze", p, code=3, needles=("failed to import", "nonexistent_pkg_xyz", "Install the missing package"))


def test_E05_model_file_raises_at_import(tmp_path):
    p = write(tmp_path, "boom.py", "x = 1 / 0\n")
    run("analyze", p, code=3, needles=("raised ZeroDivisionError while being imported",))


def test_E06_no_model_found(tmp_path):
    p = write(tmp_path, "nom.py", "x = 1\n")
    run("analyze", p, code=3, needles=("defines no model", "--entry"))


def test_E07_several_candidates(tmp_path):
    p = write(tmp_path, "sev.py", "import torch.nn as nn\na = nn.Conv2d(3, 3, 3)\nb = nn.Conv2d(3, 3, 3)\n")
    run("analyze", p, code=3, needles=("several candidate models (a, b)", "--entry"))


def test_E08_entry_not_found(tmp_path):
    p = write(tmp_path, "ent.py", "import torch.nn as nn\nnet = nn.Conv2d(3, 3, 3)\n")
    run("analyze", p, "--entry", "missing", code=3, needles=("has no attribute 'missing'", "Candidates: net"))


def test_E09_factory_raises(tmp_path):
    p = write(tmp_path, "fr.py", "def build_model():\n    raise ValueError('boom')\n")
    run("analyze", p, code=3, needles=("build_model() raised ValueError: boom",))


def test_E10_factory_returns_non_module(tmp_path):
    p = write(tmp_path, "nm.py", "def build_model():\n    return 42\n")
    run("analyze", p, code=3, needles=("gave a int, not a torch.nn.Module",))


def test_E11_example_inputs_raises(tmp_path):
    p = write(tmp_path, "ei.py", """
        import torch.nn as nn
        model = nn.Conv2d(3, 3, 3)
        def example_inputs():
            raise RuntimeError('no data')
    """)
    run("analyze", p, code=3, needles=("example_inputs() raised RuntimeError: no data", "--input"))


def test_E12_bad_declared_input(tmp_path):
    p = write(tmp_path, "bi.py", "import torch.nn as nn\nmodel = nn.Conv2d(3, 3, 3)\nINPUT_SHAPE = 'big'\n")
    run("analyze", p, code=3, needles=("INPUT_SHAPE = 'big' is not a shape",))


def test_E13_unknown_spec_kind():
    run("analyze", "not-a-spec", code=3, needles=("Cannot tell what kind of model spec",))


def test_E14_import_spec_module_missing():
    run("analyze", "no_such_pkg_xyz.models:net", code=3, needles=("Cannot import 'no_such_pkg_xyz.models'",))


def test_E15_import_spec_attr_missing():
    run("analyze", "torch.nn:NoSuchLayer", code=3, needles=("has no attribute 'NoSuchLayer'",))


def test_E16_unknown_timm_model():
    pytest.importorskip("timm")
    run("analyze", "timm:no_such_net_xyz", code=3, needles=("timm has no model called 'no_such_net_xyz'", "model list"))


# ------------------------------------------------------------------------------- E17-E22: .pt files
@pytest.fixture()
def pt_files(tmp_path):
    files = {
        "module": tmp_path / "mod.pt",
        "state_dict": tmp_path / "sd.pt",
        "list": tmp_path / "list.pt",
        "corrupt": tmp_path / "corrupt.pt",
        "truncated": tmp_path / "trunc.pt",
    }
    torch.save(nn.Conv2d(3, 3, 3), files["module"])
    torch.save(nn.Conv2d(3, 3, 3).state_dict(), files["state_dict"])
    torch.save([1, 2, 3], files["list"])
    files["corrupt"].write_bytes(b"PK\x03\x04garbage" * 10)
    files["truncated"].write_bytes(files["module"].read_bytes()[:300])
    return files


def test_E17_pickled_module_needs_trust(pt_files):
    run("analyze", pt_files["module"], code=3, needles=("unpickling can run arbitrary code", "--trust"))


def test_E18_pickled_module_with_trust_loads(pt_files):
    run("analyze", pt_files["module"], "--trust", code=0, needles=("convolutional",))


def test_E19_pt_holds_state_dict(pt_files):
    run("analyze", pt_files["state_dict"], code=3, needles=("(a state_dict?), not an nn.Module",))


def test_E20_pt_holds_non_module(pt_files):
    run("analyze", pt_files["list"], code=3, needles=("gave a list, not a torch.nn.Module",))


def test_E21_corrupted_pt(pt_files):
    run("analyze", pt_files["corrupt"], code=3, needles=("could not be loaded", "truncated or corrupted"))


def test_E22_truncated_pt(pt_files):
    run("analyze", pt_files["truncated"], "--trust", code=3, needles=("could not be loaded", "truncated or corrupted"))


def test_trust_help_says_why():
    res = runner.invoke(app, ["analyze", "--help"])
    assert "--trust" in res.output and "arbitrary code" in res.output


# ------------------------------------------------------------------------------- E23-E27: usage
def test_E23_input_not_a_shape(tmp_path):
    p = write(tmp_path, "m.py", "import torch.nn as nn\nmodel = nn.Conv2d(3, 3, 3)\n")
    run("analyze", p, "--input", "1xaxb", code=2, needles=("--input '1xaxb' is not a shape",))


def test_E24_input_zero_size(tmp_path):
    p = write(tmp_path, "m.py", "import torch.nn as nn\nmodel = nn.Conv2d(3, 3, 3)\n")
    run("analyze", p, "--input", "1x3x0x8", code=2, needles=("is not a shape",))


def test_E25_check_not_a_class(tmp_path):
    p = write(tmp_path, "m.py", "import torch.nn as nn\nmodel = nn.Conv2d(3, 3, 3)\n")
    run("analyze", p, "--check", "round", code=2, needles=("--check 'round' is not a class",))


def test_E26_unknown_option(tmp_path):
    run("analyze", "x.py", "--frobnicate", code=2, needles=("No such option",))


def test_E27_rewrite_unknown_target(tmp_path):
    p = write(tmp_path, "rw.py", CONV1X1)
    run("rewrite", p, "--to", "mlp", code=2, needles=("--to 'mlp' is not a rewrite target",))


def test_E28_check_failed(tmp_path):
    p = write(tmp_path, "m.py", "import torch.nn as nn\nmodel = nn.Conv2d(3, 3, 3)\nINPUT_SHAPE = (1, 3, 16, 16)\n")
    run("analyze", p, "--check", "fixed", code=1, needles=("check failed: expected fixed, got convolutional",))


# ------------------------------------------------------------------------------- E29-E34: inputs
def test_E29_input_rank_wrong(tmp_path):
    p = write(tmp_path, "m.py", "import torch.nn as nn\nmodel = nn.Conv2d(3, 3, 3)\n")
    run("analyze", p, "--input", "1x3x8x8x8", code=3,
        needles=("fails on its example input of shape 1x3x8x8x8", "Expected 3D (unbatched) or 4D (batched)"))


def test_E30_input_too_small(tmp_path):
    p = write(tmp_path, "m.py", """
        import torch.nn as nn
        model = nn.Sequential(nn.Conv2d(3, 3, 7), nn.MaxPool2d(2), nn.Conv2d(3, 3, 7))
    """)
    run("analyze", p, "--input", "1x3x8x8", code=3,
        needles=("fails on its example input of shape 1x3x8x8", "Kernel size can't be greater than actual input size"))


def test_E31_wrong_channel_count(tmp_path):
    p = write(tmp_path, "m.py", "import torch.nn as nn\nmodel = nn.Conv2d(3, 3, 3)\n")
    run("analyze", p, "--input", "1x4x16x16", code=3, needles=("fails on its example input", "channel"))


def test_E32_rank2_input(tmp_path):
    p = write(tmp_path, "m.py", "import torch.nn as nn\nmodel = nn.Linear(3, 3)\nINPUT_SHAPE = (4, 3)\n")
    run("analyze", p, code=3, needles=("non-image input: no spatial dims", "[4, 3]", "rank 2"))


def test_E33_sequence_model_token_ids(tmp_path):
    p = write(tmp_path, "tok.py", """
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.e = nn.Embedding(100, 16); s.l = nn.Linear(16, 2)
            def forward(s, ids):
                return s.l(s.e(ids))
        model = M()
        def example_inputs():
            return torch.randint(0, 100, (2, 12))
    """)
    run("analyze", p, code=3, needles=("non-image input: no spatial dims", "int64, token ids"))


def test_E34_several_inputs_analysed_wrt_image(tmp_path):
    p = write(tmp_path, "two.py", """
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.c = nn.Conv2d(3, 4, 3); s.e = nn.Linear(5, 4)
            def forward(s, cond, x):
                return s.c(x) + s.e(cond)[:, :, None, None]
        model = M()
        def example_inputs():
            return (torch.randn(1, 5), torch.randn(1, 3, 32, 32))
    """)
    run("analyze", p, code=0, needles=("fully convolutional", "input 1x3x32x32", "[1, 4, H - 2, W - 2]"))


# ------------------------------------------------------------------------------- E35-E39: tracing/shapes
def test_E35_untraceable_control_flow(tmp_path):
    p = write(tmp_path, "cf.py", """
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.c = nn.Conv2d(3, 3, 3)
            def forward(s, x):
                if x.sum() > 0:
                    return s.c(x)
                return x
        model = M()
        INPUT_SHAPE = (1, 3, 16, 16)
    """)
    # the branch is in the root's own forward: no --leaf to suggest (the root cannot be a leaf)
    res = run("analyze", p, code=3, needles=("could not trace M", "if x.sum() > 0", "no submodule to pass to --leaf",
                                             "torch.where"))
    assert "--leaf M" not in res.output


def test_E36_data_dependent_shape(tmp_path):
    p = write(tmp_path, "dd.py", """
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.c = nn.Conv2d(3, 3, 3)
            def forward(s, x):
                return torch.nonzero(s.c(x))
        model = M()
        INPUT_SHAPE = (1, 3, 16, 16)
    """)
    run("analyze", p, code=0, needles=("`nonzero` cannot run on meta tensors", "come from a real forward"))


def test_E37_op_without_shape_rule(tmp_path):
    p = write(tmp_path, "op.py", """
        import torch, torch.nn as nn

        @torch.library.custom_op("mixfx_test::double", mutates_args=())
        def double(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.c = nn.Conv2d(3, 3, 3)
            def forward(s, x):
                return double(s.c(x))
        model = M()
        INPUT_SHAPE = (1, 3, 16, 16)
    """)
    run("analyze", p, code=0, needles=("cannot run on meta tensors",))


def test_E38_dict_output(tmp_path):
    p = write(tmp_path, "do.py", """
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.c = nn.Conv2d(3, 4, 3); s.d = nn.Conv2d(4, 4, 3, stride=2)
            def forward(s, x):
                a = s.c(x); b = s.d(a)
                return {"a": a, "b": b, "pooled": b.mean((2, 3))}
        model = M()
        INPUT_SHAPE = (1, 3, 32, 32)
    """)
    run("analyze", p, code=0, needles=("[1, 4, H - 2, W - 2]", "[1, 4, (H - 5)//2 + 1, (W - 5)//2 + 1]", "[1, 4]"))


def test_E39_tuple_output(tmp_path):
    p = write(tmp_path, "to.py", """
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.c = nn.Conv2d(3, 4, 3, stride=2); s.fc = nn.Linear(4, 10)
            def forward(s, x):
                f = s.c(x)
                return f, s.fc(f.mean((2, 3)))
        model = M()
        INPUT_SHAPE = (1, 3, 32, 32)
    """)
    run("analyze", p, code=0, needles=("[1, 4, (H - 3)//2 + 1, (W - 3)//2 + 1]", "[1, 10]"))


# ------------------------------------------------------------------------------- E40-E46: rewrite output
@pytest.fixture()
def rw_model(tmp_path):
    return write(tmp_path, "rw.py", CONV1X1)


def _left_over(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_E40_output_folder_missing(tmp_path, rw_model):
    run("rewrite", rw_model, "--to", "linear", "-o", tmp_path / "missing" / "out.pt", code=5,
        needles=("does not exist",))
    assert _left_over(tmp_path, {"rw.py", "__pycache__"}) == []


def test_E41_output_folder_read_only(tmp_path, rw_model, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permissions: make the check see what a user would
        import mixfx.saving

        real_access = os.access
        monkeypatch.setattr(mixfx.saving.os, "access",
                            lambda p, mode: False if Path(p) == ro and mode & os.W_OK else real_access(p, mode))
    try:
        run("rewrite", rw_model, "--to", "linear", "-o", ro / "out.pt", code=5, needles=("is not writable",))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_E42_output_over_input(tmp_path, rw_model):
    before = Path(rw_model).read_bytes()
    run("rewrite", rw_model, "--to", "linear", "-o", rw_model, code=5,
        needles=("refusing to write the output over the input model",))
    assert Path(rw_model).read_bytes() == before


def test_E43_disk_full_mid_write(tmp_path, rw_model, monkeypatch):
    import mixfx.saving

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")  # a partial temp file, as a real ENOSPC leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mixfx.saving.torch, "save", full)
    run("rewrite", rw_model, "--to", "linear", "-o", tmp_path / "out.pt", code=5,
        needles=("cannot write", "No space left on device"))
    assert _left_over(tmp_path, {"rw.py", "__pycache__"}) == []


def test_E44_interrupted_mid_rewrite(tmp_path, rw_model, monkeypatch):
    import mixfx.saving

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mixfx.saving.os, "replace", interrupt)
    run("rewrite", rw_model, "--to", "linear", "-o", tmp_path / "out.pt", code=130,
        needles=("interrupted: nothing was written",))
    assert _left_over(tmp_path, {"rw.py", "__pycache__"}) == []


def test_E45_verification_failed(tmp_path, rw_model, monkeypatch):
    from passes.conv_to_linear import ConvToLinear

    real_call = ConvToLinear.call

    def corrupting(self, gm):
        res = real_call(self, gm)
        for m in res.graph_module.modules():
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    m.bias.add_(1.0)
                break
        return res

    monkeypatch.setattr(ConvToLinear, "call", corrupting)
    run("rewrite", rw_model, "--to", "linear", "-o", tmp_path / "out.pt", code=4,
        needles=("is not equivalent to the original", "Nothing was written"))
    assert _left_over(tmp_path, {"rw.py", "__pycache__"}) == []


def test_E46_rewrite_pass_raises(tmp_path, rw_model, monkeypatch):
    from passes.conv_to_linear import ConvToLinear

    def broken(self, gm):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(ConvToLinear, "call", broken)
    run("rewrite", rw_model, "--to", "linear", "-o", tmp_path / "out.pt", code=4,
        needles=("failed on", "RuntimeError: injected fault", "Nothing was rewritten"))
    assert _left_over(tmp_path, {"rw.py", "__pycache__"}) == []


def test_E47_interrupted_during_analysis(tmp_path, rw_model, monkeypatch):
    import importlib

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    # the command imports the analyser when it runs (mixfx --help does not import torch)
    monkeypatch.setattr(importlib.import_module("mixfx.analysis"), "analyze", interrupt)
    run("analyze", rw_model, code=130, needles=("interrupted",))


def test_debug_shows_traceback(tmp_path):
    p = write(tmp_path, "fr.py", "def build_model():\n    raise ValueError('boom')\n")
    res = runner.invoke(app, ["analyze", p, "--debug"])
    assert res.exit_code != 0
    from mixfx.errors import ModelLoadError

    assert isinstance(res.exception, ModelLoadError)
