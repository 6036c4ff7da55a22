"""Module paths folded for people: 24 blocks read as one line (`blocks.*.mlp.fc*`). Torch-free,
so the CLI can use it before anything heavy is imported."""
from __future__ import annotations

import re


def name_patterns(names: list[str]) -> list[str]:
    """Module paths with their numbers as `*`, each pattern once; a pattern matched by one name
    only is that name, and a bare `*` (children of a Sequential: 0, 2, ...) lists the names."""
    by_pattern: dict[str, list[str]] = {}
    for n in names:
        by_pattern.setdefault(re.sub(r"\d+", "*", n), []).append(n)
    out: list[str] = []
    for pattern, group in by_pattern.items():
        out += group if len(group) == 1 or not re.search(r"[A-Za-z]", pattern) else [pattern]
    return out
