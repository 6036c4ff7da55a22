"""Rewrite passes over torch.fx GraphModules. One module per rewrite; see `passes.base`.

`passes_for("conv")` / `passes_for("linear")` give the default pipeline for each direction:
patch embeddings first (a patchify Linear must be recognised before it is turned into a 1x1
conv), then the dense layers, then the shared layout clean-up. `passes_for("fcn")` is the one
head-convolutionalising pass (`passes.fcn`).
"""
from __future__ import annotations

import fnmatch

from passes.base import Change, RewritePass, RewritePassResult, Skip

__all__ = ["Change", "Skip", "RewritePass", "RewritePassResult", "passes_for", "PASS_GROUPS"]

# --only PATTERN matches a group name or a pass name (glob).
PASS_GROUPS = {"patchify": ("patchify_to_conv", "conv_to_patchify"),
               "dense": ("linear_to_conv", "conv_to_linear"),
               "layout": ("layout",),
               "fcn": ("fcn",),
               "cure": ("cure",)}


def _all_passes(target: str) -> list[RewritePass]:
    from passes.layout import LayoutCleanup

    if target == "conv":
        from passes.linear_to_conv import LinearToConv
        from passes.patchify_to_conv import PatchifyToConv

        return [PatchifyToConv(), LinearToConv(), LayoutCleanup()]
    if target == "linear":
        from passes.conv_to_linear import ConvToLinear
        from passes.conv_to_patchify import ConvToPatchify

        return [ConvToPatchify(), ConvToLinear(), LayoutCleanup()]
    if target == "fcn":
        from passes.fcn import Convolutionalise

        return [Convolutionalise()]
    if target == "polymorphic":
        from passes.cure import Cure

        return [Cure()]
    raise ValueError(f"unknown rewrite target {target!r}: expected 'conv', 'linear', 'fcn' or 'polymorphic'")


def passes_for(target: str, only: str | None = None) -> list[RewritePass]:
    """The default passes for `--to target`, optionally filtered by `--only` (group or pass name).
    The layout clean-up always runs last when any pass is selected."""
    selected = _all_passes(target)
    if only is None:
        return selected
    names = set()
    for group, members in PASS_GROUPS.items():
        if fnmatch.fnmatch(group, only):
            names.update(members)
    keep = [p for p in selected if p.name in names or fnmatch.fnmatch(p.name, only)]
    layout = [p for p in selected if p.name == "layout"]
    if keep and layout and not any(p.name == "layout" for p in keep):
        keep.append(layout[0])
    return keep
