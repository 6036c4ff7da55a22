"""Cure: an explicit size check (`torch._assert`, timm's `_assert`, `torch._check`) is dropped.

Such a check encodes "the model was built for this size"; once the structural causes are cured
it only stands in the way. Each dropped check is listed as a change; the condition nodes that
only fed it are removed with it.
"""
from __future__ import annotations

import re

from torch.fx import GraphModule, Node

from mixfx.tracing import is_assert_target


def is_size_check(node: Node) -> bool:
    return node.op == "call_function" and is_assert_target(node.target) and not node.users


def drop_check(gm: GraphModule, node: Node) -> str:
    """Erase `node` and the condition nodes only it used; returns the check's message."""
    message = next((a for a in node.args[1:] if isinstance(a, str)), None)
    inputs = list(node.all_input_nodes)
    gm.graph.erase_node(node)
    stack, erased = inputs, set()
    while stack:  # the comparison, the getattr(x, 'shape')[i] it read, ...
        n = stack.pop()
        if n not in erased and not n.users and n.op in ("call_function", "call_method"):
            erased.add(n)
            stack.extend(n.all_input_nodes)
            gm.graph.erase_node(n)
    # fx writes the traced sizes into f-string messages as `Proxy(getitem_2)`
    return re.sub(r"Proxy\(\w+\)", "?", message) if message else "size check"
