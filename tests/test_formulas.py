"""Guard semantics and formula printing: torch's ShapeEnv expressions in the user's terms."""
from __future__ import annotations

import math

import sympy
from torch.utils._sympy.functions import FloorDiv, PythonMod

from mixfx.formulas import characterise, format_expr, summarise_domain

H = sympy.Symbol("s36", integer=True, positive=True)
W = sympy.Symbol("s98", integer=True, positive=True)
SYM = {"H": H, "W": W}
EX = {"H": 224, "W": 224}


def kinds(expr):
    return [(m.kind, m.text) for m in characterise(expr, SYM, EX)]


def test_conv_chain_prints_as_ceil():
    assert format_expr(FloorDiv(H - 1, 32) + 1, SYM) == "ceil(H/32)"
    assert format_expr(FloorDiv(H + 2 - 3, 2) + 1, SYM) == "ceil(H/2)"
    assert format_expr(FloorDiv(H, 16), SYM) == "H//16"


def test_products_of_floordivs_keep_parentheses():
    text = format_expr(FloorDiv(H, 16) * FloorDiv(W, 16) + 1, SYM)
    assert text == "(H//16)*(W//16) + 1"
    assert eval(text, {}, {"H": 224, "W": 160}) == 14 * 10 + 1


def test_printed_formulas_evaluate_like_the_original():
    exprs = [FloorDiv(H - 1, 2) + 1, FloorDiv(H + 5, 4), FloorDiv(H - 7, 3) + 2, 3 * FloorDiv(H, 8) + 1]
    for e in exprs:
        text = format_expr(e, SYM)
        for h in range(8, 300, 7):
            want = int(e.xreplace({H: h}))
            assert eval(text, {"ceil": math.ceil}, {"H": h}) == want, (text, h)


def test_token_count_pin_is_fixed():
    assert kinds(sympy.Eq(FloorDiv(H, 16) * FloorDiv(W, 16), 196)) == [("fixed", "(H//16)*(W//16) == 196")]
    assert kinds(sympy.Eq(H, 224)) == [("fixed", "H == 224")]


def test_divisibility_and_min_size():
    assert kinds(sympy.Eq(PythonMod(H, 16), 0)) == [("divisible", "H % 16 == 0")]
    assert kinds(H >= 16) == [("min_size", "H >= 16")]
    # a reshape's numel check splits into one divisibility per dim
    numel = sympy.Eq(3 * H * W, 3 * 16 * FloorDiv(H, 16) * 16 * FloorDiv(W, 16))
    assert kinds(numel) == [("divisible", "H % 16 == 0"), ("divisible", "W % 16 == 0")]


def test_specialisation_noise_is_not_a_constraint():
    assert kinds(sympy.Ne(FloorDiv(H - 1, 2) + 1, 1))[0][0] == "specialisation"
    assert kinds(sympy.Ne(FloorDiv(H, 16) * FloorDiv(W, 16), FloorDiv(H, 16)))[0][0] == "specialisation"


def test_scattered_truth_set_is_not_fixed():
    # a view's stride branch: true at many unrelated sizes, so it does not pin the input
    assert kinds(sympy.Eq(PythonMod(FloorDiv(H, 4), FloorDiv(H, 28)), 0))[0][0] != "fixed"


def test_window_partition_guards_collapse_to_one_constraint_per_dim():
    exprs = [sympy.Eq(PythonMod(FloorDiv(H, 4), 7), 0), sympy.Eq(PythonMod(FloorDiv(W, 4), 7), 0), H >= 28]
    assert summarise_domain(exprs, SYM, EX) == ["(H//4) % 7 == 0", "(W//4) % 7 == 0"]


def test_a_period_longer_than_the_window_is_read_as_a_period_not_a_pin():
    """HaloNet accepts H % 256 in {0, 253, 254, 255}: within 1..example+window that looks like the
    pin `H in {253, ..., 256}`; the wider look finds the period."""
    guard = sympy.Lt(PythonMod(H + 3, 256), 4)
    assert summarise_domain([guard], SYM, {"H": 256, "W": 256}) == ["H % 256 in {0, 253, 254, 255}"]
    [m] = characterise(guard, SYM, {"H": 256, "W": 256})
    assert m.kind != "fixed" and m.modulus == 256


def test_predicate_reads_ceil_as_the_printer_spells_it():
    """sympy's printer writes ceiling as `math.ceil(...)`; an unknown name read as False (a
    pooled-size guard then looked unsatisfiable)."""
    import sympy as _sympy

    from mixfx.formulas import predicate as _predicate

    h = _sympy.Symbol("s0", positive=True, integer=True)
    f = _predicate(_sympy.Eq(_sympy.ceiling(h / 3), 5), {"H": h})
    assert [x for x in range(1, 30) if f(H=x)] == [13, 14, 15]


def test_a_period_that_starts_at_a_minimum_size_is_a_period_and_a_minimum():
    """A CLIP ResNet's attention pool accepts H in 31..34, 63..66, ...: periodic (32) from 31 on,
    but not below (1 and 2 do not run though 33 and 34 do). Read as a period and a minimum, not
    as the first six sizes and an ellipsis."""
    guard = sympy.And(sympy.Lt(PythonMod(H + 1, 32), 4), H >= 31)
    texts = summarise_domain([guard], SYM, EX)
    assert texts == ["H % 32 in {0, 1, 2, 31}", "H >= 31"]
    for h in range(1, 600):  # the texts (Python expressions) accept exactly what the guard does
        assert bool(guard.subs(H, h)) == all(eval(t, {"H": h}) for t in texts), h  # noqa: S307


def test_guards_read_back_from_torchs_log_print_like_the_others():
    """torch.export's guard log is parsed back with sympify: `floor(s0/16)` is sympy's floor,
    not FloorDiv (gemma4_vit's constraints showed `math.floor((1/16)*H)`)."""
    text = format_expr(sympy.Mod(sympy.floor(H / 16) * sympy.floor(W / 16), 9), SYM)
    assert text == "((H//16)*(W//16)) % 9"
    assert format_expr(sympy.ceiling(H / 32) + 1, SYM) == "ceil(H/32) + 1"
    for h, w in [(224, 224), (230, 97), (17, 300)]:  # and it means what the guard means
        assert eval(text, {"H": h, "W": w}) == (h // 16) * (w // 16) % 9  # noqa: S307
