"""Model specs -> (nn.Module, example input).

Accepted specs (see README "Model specs"):
- `path/to/model.py`: the model is `--entry NAME` if given, else the first of `build_model()`,
  `create_model()`, `get_model()`, `model` (an instance) that the file defines, else the only
  nn.Module instance or zero-argument nn.Module subclass defined in the file. The example input is
  `example_inputs()` (a tensor or a tuple of tensors) or `INPUT_SHAPE = (1, 3, 224, 224)`. With
  several inputs, the first floating tensor of rank >= 3 is the one analysed (its H, W vary); the
  others are held at their example values (`hold_other_inputs`). A non-floating example (token
  ids) is kept as given, so that the model runs and the analyser can say it has no spatial dims.
- `path/to/model.pt`: a pickled nn.Module. Loaded with `weights_only=True` unless `trust=True`,
  because unpickling a full module can run arbitrary code. A module saved by `mixfx rewrite`
  carries its example input's shape (`MIXFX_INPUT_SHAPE`), used when no `--input` is given.
- `path/to/folder`: what `mixfx rewrite --format folder` wrote (needs `trust=True`: its
  module.py unpickles modules); its `INPUT_SHAPE` is the example input.
- `package.module:attr`: an importable factory (called with no arguments) or module instance.
- `timm:NAME` / `torchvision:NAME` (random weights, nothing downloaded: torchvision builders get
  None for every weights argument they take, `weights_backbone` included); keyword arguments
  for the builder may follow `?`, joined by `&`: `timm:vit_tiny_patch16_224?dynamic_img_size=True`.
A forward with several required inputs needs them all from `example_inputs()` (a model file);
anything else is refused with a message that says so.
`--input 1x3x256x320` (`input_shape`) overrides any declared input; otherwise timm's
`pretrained_cfg["input_size"]`, else 1x3x224x224.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mixfx import progress
from mixfx.errors import InputSpecError, ModelLoadError, UsageError

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
ENTRY_POINTS = ("build_model", "create_model", "get_model", "model")


@dataclass
class LoadedModel:
    module: nn.Module
    example_input: torch.Tensor
    name: str
    spec: str
    source_path: str | None = None  # the user's file, never to be overwritten
    input_from: str = "default"  # where the example input shape came from

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.example_input.shape)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' (or '1,3,224,224') -> (1, 3, 224, 224). A usage error (exit 2) unless it is
    at least batch x channels x one spatial size, all >= 1."""
    example = "Write it as sizes joined by 'x': batch x channels x spatial sizes, e.g. --input 1x3x224x224."
    parts = text.lower().replace(",", "x").replace(" ", "").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input {text!r} is not a shape.", example) from None
    zero = [i for i, d in enumerate(shape) if d <= 0]
    if zero:
        which = ", ".join(f"size {i + 1} is {shape[i]}" for i in zero)
        raise UsageError(f"--input {text!r} is not a shape: {which}; every size must be at least 1.", example)
    if len(shape) < 3:
        raise UsageError(
            f"--input {text!r} has {len(shape)} size{'s' if len(shape) != 1 else ''}: mixfx needs batch x channels "
            "x at least one spatial size (the sizes it varies).",
            "For an image model write e.g. --input 1x3x224x224; a model without spatial dims cannot be analysed.")
    return shape


def random_input(shape: Sequence[int], device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen)
    return x.to(device) if str(device) != "cpu" else x


def load_model(
    spec: str,
    *,
    entry: str | None = None,
    input_shape: Sequence[int] | str | None = None,
    trust: bool = False,
    meta: bool = False,
) -> LoadedModel:
    """Resolve `spec` to a model in eval mode and its example input (see module docstring).

    `meta=True` builds the model on the meta device (no weight memory; enough for analysis)."""
    if isinstance(input_shape, str):
        input_shape = parse_input_shape(input_shape)
    build_ctx = torch.device("meta") if meta else contextlib.nullcontext()
    declared: tuple[int, ...] | None = None
    declared_tensors: _Declared | None = None
    declared_from = "default"
    source_path = None
    if spec.startswith(("timm:", "torchvision:")):
        module, declared, name = _load_hub(spec, build_ctx)
        declared_from = spec.split(":", 1)[0] + " config" if declared else "default"
    elif spec.endswith((".pt", ".pth")):
        source_path = str(Path(spec).resolve())
        module, name = _load_pickle(spec, trust), Path(spec).stem
        saved_shape = getattr(module, "MIXFX_INPUT_SHAPE", None)  # written by mixfx.saving
        if saved_shape:
            declared, declared_from = tuple(int(d) for d in saved_shape), "the shape saved with the module"
    elif Path(spec).is_dir() and (Path(spec) / "module.py").is_file():
        source_path = str(Path(spec).resolve())
        module, declared, name = _load_saved_folder(spec, trust)
        declared_from = "INPUT_SHAPE in the folder" if declared else "default"
    elif spec.endswith(".py") or os.sep in spec or Path(spec).exists():
        source_path = str(Path(spec).resolve())
        module, declared, declared_from, name, declared_tensors = _load_file(spec, entry, build_ctx)
    elif ":" in spec:
        module, name = _load_import(spec, build_ctx), spec
    else:
        raise ModelLoadError(
            f"Cannot tell what kind of model spec {spec!r} is.",
            "Pass a .py file that defines the model, a .pt file, `package.module:attr`, `timm:NAME` or `torchvision:NAME`.",
        )
    if not isinstance(module, nn.Module):
        raise ModelLoadError(
            f"{spec!r} gave a {type(module).__name__}, not a torch.nn.Module.",
            "Point the spec (or --entry) at an nn.Module instance or a function that returns one.",
        )
    module.eval()
    _check_single_input(module, spec, declared_tensors)
    shape = tuple(input_shape) if input_shape else (declared or DEFAULT_INPUT_SHAPE)
    input_from = "--input" if input_shape else declared_from
    device = "meta" if meta else "cpu"
    example = random_input(shape, device)
    if declared_tensors is not None:
        given = declared_tensors.tensors[declared_tensors.index]
        if not given.is_floating_point():  # token ids, masks: random floats would not even run
            example = given.to(device) if tuple(given.shape) == shape else torch.zeros(shape, dtype=given.dtype, device=device)
        if len(declared_tensors.tensors) > 1:
            input_from += f" (input {declared_tensors.index + 1} of {len(declared_tensors.tensors)}; the others held at their example values)"
    return LoadedModel(module, example, name, spec, source_path, input_from)


def required_inputs(module: nn.Module) -> list[str]:
    """The names of forward()'s positional arguments that have no default."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is p.empty]


def _check_single_input(module: nn.Module, spec: str, declared: "_Declared | None") -> None:
    """mixfx makes one example input; a forward that needs several (optical flow on two images,
    an image and a mask) must get them from example_inputs()."""
    names = required_inputs(module)
    given = len(declared.tensors) if declared is not None else 1
    if len(names) <= given:
        return
    args = ", ".join(names)
    raise InputSpecError(
        f"{type(module).__name__}.forward takes {len(names)} required inputs ({args}); mixfx makes only one "
        f"example input from --input or the model's declared shape, so it cannot call {spec!r} as given.",
        f"Write a model file with build_model() returning the model and example_inputs() returning a tuple of "
        f"{len(names)} tensors ({args}): the first floating tensor of rank >= 3 is the analysed input (its H, W "
        f"vary), the others are held at their example values. See README, Model specs.")


def _load_hub(spec: str, build_ctx) -> tuple[nn.Module, tuple[int, ...] | None, str]:
    lib, rest = spec.split(":", 1)
    name, _, query = rest.partition("?")
    kwargs = dict(_parse_kwarg(kv) for kv in query.split("&") if kv)
    try:
        package = importlib.import_module(lib)
        if lib == "torchvision":
            importlib.import_module("torchvision.models")
    except ImportError as exc:
        raise ModelLoadError(f"{spec!r} needs the {lib} package, which is not installed ({exc}).",
                             f"Install it (pip install 'mixfx[timm]' brings timm and torchvision).") from exc
    known = package.is_model(name) if lib == "timm" else name in package.models.list_models()
    if not known:
        raise ModelLoadError(f"{lib} has no model called {name!r}.",
                             f"Check the name against {lib}'s model list "
                             + ("(timm.list_models())." if lib == "timm" else "(torchvision.models.list_models())."))
    declared = None
    if lib == "torchvision":
        kwargs = {**no_weights_kwargs(package.models.get_model_builder(name)), **kwargs}
    progress.stage(f"building {lib}:{name}")
    try:
        with build_ctx:
            if lib == "timm":
                model = package.create_model(name, pretrained=False, **kwargs)
                cfg = getattr(model, "pretrained_cfg", None) or {}
                if cfg.get("input_size"):
                    declared = (1, *cfg["input_size"])
            else:
                model = package.models.get_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(*_explain_build_failure(lib, name, kwargs, exc)) from exc
    return model, declared, name


def no_weights_kwargs(builder) -> dict[str, Any]:
    """Keyword arguments that keep a torchvision builder from downloading anything: every
    `weights`, `weights_*` / `*_weights` argument (the backbone's of a detection or segmentation
    model) None, every `pretrained*` one False."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {"weights": None}
    out: dict[str, Any] = {}
    for p in params:
        if p == "weights" or p.startswith("weights_") or p.endswith("_weights"):
            out[p] = None
        elif p.startswith("pretrained"):
            out[p] = False
    return out or {"weights": None}


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _explain_build_failure(lib: str, name: str, kwargs: dict, exc: BaseException) -> tuple[str, str]:
    """Message + hint naming the real cause: a download attempt, an unknown keyword argument, or
    whatever the builder raised."""
    import urllib.error

    chain = _exception_chain(exc)
    download = next((e for e in chain if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError))
                     or type(e).__module__.startswith(("requests", "urllib3", "huggingface_hub"))), None)
    if download is not None:
        asked = [k for k, v in kwargs.items() if ("weights" in k or k.startswith("pretrained")) and v not in (None, False)]
        hint = (f"Drop {', '.join('?' + k for k in asked)} to build it with random weights (mixfx needs no trained "
                "weights)." if asked else
                "mixfx builds models with random weights, yet an argument still asks for pretrained ones: set it "
                f"after '?' ({lib}:{name}?ARG=None), or build the model in a .py file.")
        return (f"{lib} tried to download weights while building {name!r} and failed: "
                f"{type(download).__name__}: {download}.", hint)
    text = str(exc)
    match = re.search(r"unexpected keyword argument '([^']+)'", text)
    if isinstance(exc, TypeError) and match:
        bad = match.group(1)
        given = f" (given as ?{bad}=...)" if bad in kwargs else ""
        return (f"{lib} does not accept the keyword argument {bad!r} for {name!r}{given}: {type(exc).__name__}: {text}.",
                "Check its spelling against the model's constructor; the arguments after '?' are passed to "
                + ("timm.create_model(NAME, ...)." if lib == "timm" else "torchvision.models.get_model(NAME, ...)."))
    return (f"{lib} could not build {name!r}{' with ' + _kwargs_text(kwargs) if kwargs else ''}: "
            f"{type(exc).__name__}: {text}.",
            "Run with --debug for the traceback.")


def _kwargs_text(kwargs: dict) -> str:
    return "&".join(f"{k}={v!r}" for k, v in kwargs.items())


def _parse_kwarg(kv: str) -> tuple[str, Any]:
    key, _, value = kv.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _load_pickle(path: str, trust: bool) -> nn.Module:
    if not Path(path).is_file():
        raise ModelLoadError(f"No such file: {path}.", "Check the path.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        text = text.split(". ")[0].rstrip(".")
        if not trust and "weights_only" in str(exc):
            raise ModelLoadError(
                f"{path} holds a pickled module, which is not loaded by default: unpickling can run arbitrary code.",
                "If you trust this file, pass --trust.") from exc
        raise ModelLoadError(f"{path} could not be loaded: {text}.",
                             "Is it a file written by torch.save? It may be truncated or corrupted.") from exc
    if isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__} (a state_dict?), not an nn.Module.",
                             "mixfx needs the model itself: point it at the .py file that builds the model.")
    return obj


def _load_saved_folder(path: str, trust: bool) -> tuple[nn.Module, tuple[int, ...] | None, str]:
    """A folder written by `mixfx rewrite --format folder`: its module.py unpickles the children it
    could not write as source, hence --trust, as for a pickled .pt."""
    if not trust:
        raise ModelLoadError(
            f"{path} is a saved folder whose module.py unpickles modules, which is not done by default: "
            "unpickling can run arbitrary code.", "If you trust this folder, pass --trust.")
    from mixfx.saving import load_saved

    try:
        module = load_saved(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} could not be loaded as a saved folder: {type(exc).__name__}: {exc}.",
                             "Was it written by mixfx rewrite --format folder? --debug shows the traceback.") from exc
    package = sys.modules.get(type(module).__module__.rsplit(".", 1)[0])
    shape = getattr(sys.modules.get(type(module).__module__), "INPUT_SHAPE", None) or getattr(package, "INPUT_SHAPE", None)
    return module, (tuple(int(d) for d in shape) if shape else None), Path(path).resolve().name


def _import_file(path: Path):
    name = f"_mixfx_model_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{path} cannot be imported as Python.", "Pass a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    sys.path.insert(0, str(path.parent))  # let the file import its siblings
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ModelLoadError(f"{path} has a syntax error at line {exc.lineno}: {exc.msg}.",
                             "Fix the file and try again.") from exc
    except ImportError as exc:
        raise ModelLoadError(f"{path} failed to import: {type(exc).__name__}: {exc}.",
                             "Install the missing package or fix the import.") from exc
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} raised {type(exc).__name__} while being imported: {exc}.",
                             "Run it with python to see where; use --debug for the traceback.") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path.parent))
    return module


def _load_file(spec: str, entry: str | None, build_ctx):
    path = Path(spec)
    if not path.is_file():
        raise ModelLoadError(f"No such file: {spec}.", "Pass the path of a .py file that defines the model.")
    module = _import_file(path)
    if entry is not None:
        if not hasattr(module, entry):
            raise ModelLoadError(f"{spec} has no attribute {entry!r} (given with --entry).",
                                 f"Candidates: {', '.join(_candidates(module)) or 'none'}.")
        obj = getattr(module, entry)
        name = entry
    else:
        found = [n for n in ENTRY_POINTS if hasattr(module, n)]
        if found:
            name = found[0]
        else:
            cands = _candidates(module)
            if len(cands) != 1:
                what = "no model" if not cands else f"several candidate models ({', '.join(cands)})"
                raise ModelLoadError(
                    f"{spec} defines {what}.",
                    "Define build_model() (or create_model(), or a module-level `model`), or pick one with --entry NAME.")
            name = cands[0]
        obj = getattr(module, name)
    model = _instantiate(obj, f"{spec}:{name}", build_ctx)
    declared, declared_from, tensors = _declared_input(module, spec)
    if isinstance(model, nn.Module) and tensors is not None and len(tensors.tensors) > 1:
        device = "meta" if isinstance(build_ctx, torch.device) else "cpu"
        model = hold_other_inputs(model, [t.to(device) for t in tensors.tensors], tensors.index)
    return model, declared, declared_from, f"{path.stem}:{name}", tensors


def _candidates(module) -> list[str]:
    out = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, nn.Module):
            out.append(key)
        elif (inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__
              and _no_required_args(value)):
            out.append(key)
    return out


def _no_required_args(cls) -> bool:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())


def _instantiate(obj: Any, where: str, build_ctx) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            with build_ctx:
                return obj()
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{where}() raised {type(exc).__name__}: {exc}.",
                                 "Fix the factory (it is called with no arguments); --debug shows the traceback.") from exc
    return obj  # the caller reports "not an nn.Module"


def _declared_input(module, spec: str) -> tuple[tuple[int, ...] | None, str, "_Declared | None"]:
    if hasattr(module, "example_inputs"):
        try:
            value = module.example_inputs()
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{spec}: example_inputs() raised {type(exc).__name__}: {exc}.", "Fix it or pass --input.") from exc
        if isinstance(value, torch.Tensor):
            value = (value,)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            index = image_input_index(value)
            declared = _Declared(tuple(value), index)
            return tuple(value[index].shape), "example_inputs()", declared
        raise InputSpecError(
            f"{spec}: example_inputs() returned {type(value).__name__}, not a tensor or a tuple of tensors.",
            "Return the example input(s) as tensors, or pass --input.")
    for attr in ("INPUT_SHAPE", "input_shape"):
        if hasattr(module, attr):
            try:
                return tuple(int(d) for d in getattr(module, attr)), attr, None
            except (TypeError, ValueError) as exc:
                raise InputSpecError(f"{spec}: {attr} = {getattr(module, attr)!r} is not a shape.",
                                     "Write it as a tuple of ints, e.g. INPUT_SHAPE = (1, 3, 224, 224).") from exc
    return None, "default", None


@dataclass
class _Declared:
    """What example_inputs() returned: all the tensors, and which one is the analysed (image) input."""

    tensors: tuple[torch.Tensor, ...]
    index: int


def image_input_index(tensors: Sequence[torch.Tensor]) -> int:
    """The input that mixfx varies: the first floating tensor of rank >= 3, else the first one."""
    for i, t in enumerate(tensors):
        if t.is_floating_point() and t.dim() >= 3:
            return i
    return 0


def hold_other_inputs(model: nn.Module, tensors: Sequence[torch.Tensor], index: int) -> nn.Module:
    """Make a several-input `model` take only input `index`: the others are registered as buffers
    (`_mixfx_held_<i>`) and passed at their example values. The class keeps its name, module and
    submodule paths, so reports read as for the original model."""
    cls = type(model)
    names: list[str | None] = []
    for i, t in enumerate(tensors):
        if i == index:
            names.append(None)
            continue
        name = f"_mixfx_held_{i}"
        model.register_buffer(name, t.detach().clone(), persistent=False)
        names.append(name)

    def forward(self, x):
        args = [x if n is None else getattr(self, n) for n in names]
        return cls.forward(self, *args)

    held = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__, "_mixfx_held_inputs": tuple(names)})
    model.__class__ = held
    return model


def _load_import(spec: str, build_ctx) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(f"Cannot import {mod_name!r}: {exc}.", "Check the module name and that it is on PYTHONPATH.") from exc
    if not hasattr(module, attr):
        raise ModelLoadError(f"Module {mod_name!r} has no attribute {attr!r}.", "Check the name after ':'.")
    return _instantiate(getattr(module, attr), spec, build_ctx)
