"""The analysis report: plain dataclasses shared by the library API, the CLI and the tests.

`AnalysisReport.to_dict()` is the `--json` output; its keys are documented in README.md
("JSON schema") and versioned by `schema_version`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

SCHEMA_VERSION = 1
Classification = Literal["convolutional", "polymorphic", "fixed"]


@dataclass
class NodeInfo:
    """One graph node: `status` is spatial | static | rigid | guarded | global_mixing | head | unknown."""

    name: str
    op: str
    module: str | None
    shape: str | None  # symbolic, in input terms: "[1, 64, ceil(H/4), ceil(W/4)]"
    status: str
    depends_on: list[str] = field(default_factory=list)  # input dims ("H", "W") the output depends on
    inputs: list[str] = field(default_factory=list)  # names of the nodes it reads
    detail: str | None = None  # reason, for rigid/global-mixing/unknown nodes
    receptive_field: "ReceptiveField | None" = None  # in input pixels, for spatial nodes (issue 14)


@dataclass
class RigidNode:
    """Where polymorphism breaks. kind: "structural" (a fixed-size weight, position embedding or
    hard-coded view) or "guarded" (an explicit size check, e.g. timm's PatchEmbed assert)."""

    node: str
    module: str | None
    op: str
    kind: str
    reason: str
    condition: str  # the pinned relation in input terms: "(H//16)*(W//16) == 196"
    cure: str | None = None
    source: str = "symbolic"  # "symbolic" or "concrete" (found only by a concrete run)


@dataclass
class HeadInfo:
    node: str
    module: str | None
    op: str


@dataclass
class GlobalMixing:
    node: str
    module: str | None
    op: str
    reason: str


@dataclass
class GlobalContext:
    """A summary pooled with fixed weights over all positions and broadcast back onto the map
    (SE/ECA gate, CBAM channel gate, GroupNorm/InstanceNorm/LayerNorm statistics over H, W).
    Not mixing: it keeps a network convolutional, but makes it non-tileable."""

    node: str
    module: str | None
    op: str
    reason: str


@dataclass
class ReceptiveField:
    """Receptive field of one node's output in input pixels, one entry per spatial axis
    (Araujo, Norris & Sim, Distill 2019, generalised to DAGs). `bounded` is False when the
    extent grows with the input; `unbounded_at` then names the module where it does."""

    size: list[int] | None
    stride: list[int] | None
    offset: list[float] | None
    bounded: bool
    unbounded_at: str | None = None
    reason: str | None = None


@dataclass
class ConcreteCheck:
    """A forward on meta tensors at one concrete size (no compute)."""

    input_shape: list[int]
    ok: bool
    failed_node: str | None = None
    failed_module: str | None = None
    error: str | None = None
    failed_asserts: list[str] = field(default_factory=list)
    expected_ok: bool | None = None  # what the symbolic verdict predicts

    @property
    def agrees(self) -> bool:
        return self.expected_ok is None or self.expected_ok == (self.ok and not self.failed_asserts)


@dataclass
class AnalysisReport:
    model: str
    input_shape: list[int]
    tracer: str  # "fx" | "export" | "given"
    classification: Classification
    fully_convolutional: bool
    summary: str  # one sentence
    rigid_nodes: list[RigidNode] = field(default_factory=list)
    head: HeadInfo | None = None
    global_mixing: list[GlobalMixing] = field(default_factory=list)
    global_context: list[GlobalContext] = field(default_factory=list)
    receptive_field: ReceptiveField | None = None  # of the pre-head map (fully convolutional: the output)
    tileable: bool = False  # bounded receptive field, no global context, no global mixing
    constraints: list[str] = field(default_factory=list)
    output_shape: list[str] = field(default_factory=list)  # first output
    outputs: list[list[str]] = field(default_factory=list)  # every tensor output
    concrete_checks: list[ConcreteCheck] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped_guards: list[str] = field(default_factory=list)  # guards that are not input constraints
    unknown_nodes: list[str] = field(default_factory=list)
    nodes: list[NodeInfo] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def confirmed(self) -> bool:
        """True when every concrete check agrees with the symbolic verdict."""
        return not self.disagreements

    def to_dict(self, *, nodes: bool = True) -> dict:
        d = asdict(self)
        for check, raw in zip(self.concrete_checks, d["concrete_checks"]):
            raw["agrees"] = check.agrees
        d["confirmed"] = self.confirmed
        if not nodes:
            d.pop("nodes")
        return d
