"""Writing a rewritten GraphModule: atomically, never over the input model.

- `format="pt"`: `torch.save(gm)` (load with `torch.load(path, weights_only=False)`; the pickle
  refers to torch and to whatever modules the graph calls, e.g. timm layers).
  The example input's shape is kept on the module (`MIXFX_INPUT_SHAPE`), so that
  `mixfx analyze out.pt --trust` analyses it at the size it was rewritten at.
- `format="folder"`: `GraphModule.to_folder` (readable `module.py` + `state_dict.pt`), made
  self-contained: mixfx's own modules (`ChannelLayerNorm`) are traced into plain torch ops first,
  the paths to the weights are made relative to the folder (torch writes absolute ones), and the
  functions the generated code calls are imported at its top. Children that to_folder cannot
  write as source are pickled without their weights (on the meta device): the weights are in
  `state_dict.pt` only, loaded with `assign=True`. `INPUT_SHAPE` in `module.py` is the example
  input's shape. The folder is then imported and run once in a fresh Python process (which
  writes no `__pycache__`) before it is moved into place; if that fails nothing is written.

Both write to a temporary file/folder next to the target and `os.replace` it into place, so a
crash never leaves a half-written output and an existing output is replaced in one step. The
output's permissions follow the umask (0644 files and 0755 folders under umask 022), not the
0600/0700 of the temporary names.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

import torch
import torch.fx
from torch import nn

from mixfx.errors import OutputError

FORMATS = ("pt", "folder")
MODULE_NAME = "FxModule"
# attribute of a saved GraphModule: the example input's shape (mixfx.loading reads it back)
INPUT_SHAPE_ATTR = "MIXFX_INPUT_SHAPE"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions a plain `open`/`mkdir`
    would have given: temp files are created 0600 and temp folders 0700."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def save_module(
    gm: torch.fx.GraphModule,
    path: str | os.PathLike,
    format: str = "pt",
    *,
    input_path: str | os.PathLike | None = None,
    example_input: torch.Tensor | None = None,
    check: bool = True,
) -> Path:
    """Write `gm` to `path` atomically. Refuses to write over `input_path` (the model's own file).

    For `format="folder"`, `example_input` (default a 1x3x64x64 random tensor) is what the fresh
    process runs the saved module on; `check=False` skips that check."""
    if format not in FORMATS:
        raise OutputError(f"unknown output format {format!r}.", "Use --format pt or --format folder.")
    target = Path(path).expanduser().absolute()
    check_destination(target, input_path)
    if format == "pt":
        if target.is_dir():
            raise OutputError(f"{str(target)!r} is a folder.", "Give a file name for --format pt, or use --format folder.")
        _save_pt(gm, target, example_input)
    else:
        if target.exists() and not target.is_dir():
            raise OutputError(f"{str(target)!r} exists and is not a folder.", "Choose another -o path for --format folder.")
        _save_folder(gm, target, example_input, check)
    return target


def check_destination(target: Path, input_path: str | os.PathLike | None) -> None:
    """Refuse (OutputError, exit 5) before any work: the input model as the output, or a folder
    that is missing or not writable. Shared by every command that writes (rewrite, export)."""
    if input_path is not None and _same_path(target, Path(input_path)):
        raise OutputError(f"refusing to write the output over the input model {str(input_path)!r}.",
                          "Choose another -o path; mixfx never modifies its input.")
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(target)!r}: the folder {str(parent)!r} does not exist.",
                          "Create it first or choose another -o path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {str(target)!r}: the folder {str(parent)!r} is not writable.",
                          "Choose another -o path.")


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.expanduser().resolve()


def _save_pt(gm: torch.fx.GraphModule, target: Path, example_input: torch.Tensor | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    had = INPUT_SHAPE_ATTR in gm.__dict__
    previous = gm.__dict__.get(INPUT_SHAPE_ATTR)
    try:
        if example_input is not None:
            setattr(gm, INPUT_SHAPE_ATTR, tuple(int(d) for d in example_input.shape))
        torch.save(gm, tmp)
        follow_umask(Path(tmp))
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}.") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a module that cannot be pickled
        raise OutputError(f"cannot save the module to {str(target)!r}: {type(exc).__name__}: {exc}.") from exc
    finally:
        if example_input is not None:  # the caller's module is left as it was
            if had:
                setattr(gm, INPUT_SHAPE_ATTR, previous)
            else:
                gm.__dict__.pop(INPUT_SHAPE_ATTR, None)
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------- folder
def inline_custom_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Re-trace `gm` so that calls to mixfx's own modules become plain torch ops (to_folder would
    pickle them, and the folder would then need mixfx to load)."""
    from passes.modules import ChannelLayerNorm

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if isinstance(m, ChannelLayerNorm):
                return False
            if type(m).__module__.startswith(("torch.nn", "torch.ao.nn")):
                return not isinstance(m, nn.Sequential)
            # keep any other module the graph calls as one call (it was a leaf when traced)
            return True

    needs = any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChannelLayerNorm)
                for n in gm.graph.nodes)
    needs = needs or any(n.op == "call_function" and getattr(n.target, "__module__", "") == "passes.modules"
                         for n in gm.graph.nodes)
    if not needs:
        return gm
    graph = _Tracer().trace(gm)
    return torch.fx.GraphModule(gm, graph, type(gm).__name__)


def _import_header(gm: torch.fx.GraphModule) -> str:
    """Import lines for the globals the generated forward uses (to_folder does not write them)."""
    builtins = {"torch", "inf", "nan", "NoneType", "device", "fx_pytree", "pytree", "math", "operator", "builtins"}
    lines = ["import os", "import math", "import operator", "import builtins"]
    code = gm._graph.python_code(root_module="self")
    for name, obj in code.globals.items():
        if name in builtins or name.startswith("_") and name.startswith("__"):
            continue
        mod = getattr(obj, "__module__", None)
        qual = getattr(obj, "__qualname__", getattr(obj, "__name__", None))
        if mod and qual and "." not in qual and "<" not in qual:
            lines.append(f"from {mod} import {qual} as {name}")
    return "\n".join(lines) + "\n_HERE = os.path.dirname(os.path.abspath(__file__))\n"


# the children `GraphModule.to_folder` writes as source; any other child is pickled
_SOURCE_CHILDREN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def _weights_on_meta(gm: torch.fx.GraphModule):
    """While inside, the parameters and persistent buffers of the children that to_folder pickles
    are meta tensors (shape and dtype, no data): the pickles hold the structure, and the weights
    go to state_dict.pt once. Non-persistent buffers (index tables) stay in the pickle. The
    originals are put back on exit."""
    saved: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for _, child in gm.named_children():
            if type(child) in _SOURCE_CHILDREN:
                continue
            for m in child.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None:
                        saved.append((m._parameters, name, p))
                        m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                for name, b in list(m._buffers.items()):
                    if b is not None and name not in m._non_persistent_buffers_set:
                        saved.append((m._buffers, name, b))
                        m._buffers[name] = torch.empty_like(b, device="meta")
        yield
    finally:
        for table, name, value in reversed(saved):
            table[name] = value


_PICKLED_CHILD = re.compile(r"^(\s*setattr\(self, '([^']+)', torch\.load\([^\n]*?\)\)) # [^\n]*$", re.M)


def _save_folder(gm: torch.fx.GraphModule, target: Path, example_input: torch.Tensor | None, check: bool) -> None:
    import warnings

    gm = inline_custom_modules(gm)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        with warnings.catch_warnings(), _weights_on_meta(gm):
            warnings.simplefilter("ignore")  # to_folder warns about pickled children: checked below
            gm.to_folder(tmp, MODULE_NAME)
        torch.save(gm.state_dict(), tmp / "state_dict.pt")  # with the real weights of every child
        module_py = tmp / "module.py"
        text = module_py.read_text()
        # torch writes absolute paths into module.py; make them relative to the folder.
        text = re.sub(r"r'" + re.escape(str(tmp)) + r"/([^']*)'", r"os.path.join(_HERE, '\1')", text)
        # a pickled child's comment is its whole repr on one line (10 kB for a ViT encoder)
        text = _PICKLED_CHILD.sub(lambda m: f"{m.group(1)}  # {type(gm.get_submodule(m.group(2))).__name__}: "
                                  "structure only, weights in state_dict.pt", text)
        # the pickled children hold meta tensors: the loaded weights replace them
        text = re.sub(r"self\.load_state_dict\((torch\.load\([^\n]*?\))\)\n",
                      r"self.load_state_dict(\1, assign=True)\n", text)
        shape = tuple(int(d) for d in example_input.shape) if example_input is not None else None
        text = _import_header(gm) + f"INPUT_SHAPE = {shape!r}  # the example input it was rewritten at\n" + text
        module_py.write_text(text)
        (tmp / "__init__.py").write_text(f"from .module import {MODULE_NAME}, INPUT_SHAPE\n")
        if check:
            problem = check_folder(tmp, example_input)
            if problem:
                raise OutputError(f"the folder written for {str(target)!r} does not import and run on its own: "
                                  f"{problem}. Nothing was written.", "Use --format pt instead.")
        shutil.rmtree(tmp / "__pycache__", ignore_errors=True)
        follow_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}.") from exc
    finally:
        # whatever stopped us (a full disk, Ctrl-C between the two renames), the previous output is
        # either replaced by the new one or put back where it was
        if old is not None and old.exists():
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, target)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_CHECK = textwrap.dedent("""
    import importlib.util, os, sys, torch
    folder, shape_txt = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("mixfx_saved", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    mod = importlib.util.module_from_spec(spec); sys.modules["mixfx_saved"] = mod; spec.loader.exec_module(mod)
    m = mod.FxModule().eval()
    x = torch.randn([int(s) for s in shape_txt.split("x")])
    with torch.no_grad():
        m(x)
    print("ok")
""")


def check_folder(folder: str | os.PathLike, example_input: torch.Tensor | None = None, timeout: float = 300) -> str | None:
    """Import the saved folder and run it once in a fresh Python process (isolated from the
    current directory and PYTHONPATH). None when it works, else what went wrong."""
    shape = tuple(example_input.shape) if example_input is not None else (1, 3, 64, 64)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        proc = subprocess.run([sys.executable, "-I", "-B", "-c", _CHECK, str(folder), "x".join(map(str, shape))],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return "the check in a fresh process timed out"
    if proc.returncode != 0 or "ok" not in proc.stdout:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return tail
    return None


def load_saved(path: str | os.PathLike) -> nn.Module:
    """Load what `save_module` wrote (a .pt file or a folder)."""
    path = Path(path)
    if path.is_dir():
        import importlib.util

        name = f"mixfx_saved_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod.FxModule()
    return torch.load(path, weights_only=False)


__all__: Sequence[str] = ("save_module", "check_folder", "load_saved", "inline_custom_modules", "FORMATS")
