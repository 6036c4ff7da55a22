"""The small interface every rewrite pass shares.

Built on torch's own pass infrastructure (`PassBase.requires/call/ensures`, `PassResult`), so a
pass also runs inside `torch.fx.passes.infra.pass_manager.PassManager`. What torch's result lacks,
and users of a rewrite need, is *what* changed and what was deliberately left alone: a
`RewritePassResult` carries both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult


@dataclass(frozen=True)
class Change:
    """One rewritten node: `before`/`after` are short human descriptions (module repr or op)."""

    pass_name: str
    node: str
    module: str | None
    before: str
    after: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Skip:
    """A candidate the pass looked at and left alone, with the reason in plain words."""

    pass_name: str
    node: str
    module: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class RewritePassResult(PassResult):
    """`PassResult(graph_module, modified)` plus `changes`, `skipped` and free-form `notes`
    (e.g. "the accepted input domain changed: H % 16 == 0 is now required")."""

    def __new__(
        cls,
        graph_module: torch.fx.GraphModule,
        modified: bool,
        changes: list[Change] | None = None,
        skipped: list[Skip] | None = None,
        notes: list[str] | None = None,
    ) -> "RewritePassResult":
        self = super().__new__(cls, graph_module, modified)
        self.changes = list(changes or [])
        self.skipped = list(skipped or [])
        self.notes = list(notes or [])
        return self


class RewritePass(PassBase):
    """Base class of mixfx passes. Subclasses set `name` and implement `call(gm)`.

    Contract: `call` mutates/returns a GraphModule that computes the same function as its input
    (numerically, within float tolerance) on every input the original accepts, and returns a
    `RewritePassResult`. Anything it cannot rewrite safely is reported as a `Skip`, never guessed.
    """

    name: str = "rewrite"

    def call(self, graph_module: torch.fx.GraphModule) -> RewritePassResult:  # pragma: no cover
        raise NotImplementedError
