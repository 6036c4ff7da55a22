"""Is this network truly convolutional? The analyser behind `mixfx analyze`, one module per stage
of the data flow:

- `nodes`: naming fx nodes (module path, op) and reading their symbolic values;
- `guards`: the symbolic run's guards -> rigid nodes and input constraints;
- `size_search`: eager runs at other sizes (is it fixed? which sizes run? divisibility);
- `layout` + `locality`: every torch call of the eager forward, judged local / global mixing /
  global context / constant-size resize by the spatial extent it combines;
- `head`: which nodes depend on the input size, and where the spatial part ends;
- `core`: runs the stages in order and writes the report (`analyze`).
"""
from mixfx.analysis.core import DEFAULT_SYMBOLIC_BUDGET_S, analyze
from mixfx.analysis.nodes import module_path, op_name

__all__ = ["DEFAULT_SYMBOLIC_BUDGET_S", "analyze", "module_path", "op_name"]
