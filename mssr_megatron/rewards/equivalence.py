"""Mathematical equivalence of an extracted answer and a gold answer, on top of math-verify.

math-verify (0.9) does the heavy lifting: fractions vs decimals (3/4 = 0.75 = \\frac{3}{4}), LaTeX (\\sqrt{12} =
2\\sqrt{3}), sets in any order, intervals, equations ("x=2" vs "2"), thousands separators, and it drops
\\text{...} units ("5\\text{ cm}") and ^\\circ. What we add, decided here and pinned by tests/test_rewards.py:

* Percentages: math-verify reads "X%" as X/100 and, for integers only, also as X (50% == 0.5 and 50% == 50,
  but 12.5% != 12.5). We make the percent sign notation-tolerant for every number: "X%" matches a gold of
  X/100 and a gold of X (and "X" matches a gold "X%"), because datasets store "what percent" answers with and
  without the sign. Price: "0.5%" is accepted for a gold of 0.5.
* Units: trailing unit words ("5 cm", "10 dollars", "3 km/h", "5 m^2") and \\text/\\mathrm unit groups are
  dropped when the plain comparison fails and a number remains ("10 dollars" vs 10 is correct).
* Scientific "1.5e3" becomes 1.5\\times10^{3} (math-verify would read e as Euler's number).
* Numeric tolerance is math-verify's: a float matches after rounding to 6 decimals (1/3 vs 0.3333333 ok,
  0.333 not); a symbolic gold (\\pi, \\sqrt{3}/2) does not accept a short decimal approximation.

math-verify's own timeouts use signal.alarm, which fails off the main thread, so they are disabled here
(parsing_timeout=None, timeout_seconds=None): bounding time is the batch grader's job (grader.py).
"""

from __future__ import annotations

import logging
import re

from mssr_megatron.rewards.extract import extract_boxed, strip_math_delimiters

__all__ = ["math_equal", "normalize_answer", "strip_units", "strip_percent"]

# math-verify warns once per process that its timeout is disabled; that is deliberate here (see docstring),
# and the warning would otherwise be printed by every grading worker.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_SCI = re.compile(r"(?<![\w\\.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_PERCENT_WORD = re.compile(r"\s*(?:percent|per\s+cent|pct)\.?\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"\s*\\?%\s*$")
# A trailing unit group: \text{ cm}, \mathrm{km/h}, \mbox{m}^2. Content restricted to unit-like characters
# so that e.g. \text{ or } 3 is never stripped.
_UNIT_GROUP = re.compile(
    r"(?:\\[,;:! ]|~|\s)*\\(?:text|textrm|mathrm|mbox|rm)\s*\{\s*[A-Za-z][A-Za-z\s./]*\}\s*(?:\^\s*\{?\s*\d\s*\}?)?\s*$"
)
# Trailing unit words of two or more letters ("cm", "dollars", "km/h", "m^2" after a space) or a one-letter
# SI unit after a number and a space ("5 m", "3 s"; not "2 x", a variable). Not after a backslash: \pi stays.
_UNIT_WORD = re.compile(
    r"(?:(?<=[\d}\s])(?<!\\)[A-Za-z]{2,}|(?<=\d)\s+[mgsthlLKNJWV])"
    r"(?:\s*\^\s*\{?\s*\d\s*\}?)?(?:\s*/\s*[A-Za-z]+(?:\s*\^\s*\{?\s*\d\s*\}?)?)?\.?\s*$"
)
_DEGREE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°)\s*$")


def normalize_answer(s: str) -> str:
    """Light, always-safe rewriting of an answer string: delimiters, unicode signs, "e" notation, "percent"."""
    s = strip_math_delimiters(s)
    if "\\boxed" in s or "\\fbox" in s:  # a gold stored as "\boxed{...}"
        s = extract_boxed(s) or ""
    s = s.replace("\u2212", "-").replace("\u00d7", "\\times ").replace("\u00b7", "\\cdot ")
    s = _SCI.sub(lambda m: f"{m.group(1)}\\times10^{{{m.group(2)}}}", s)
    s = _PERCENT_WORD.sub("\\%", s)
    return s.strip()


def strip_units(s: str) -> str:
    """Drop trailing unit words / \\text{} unit groups / degree marks, as long as a digit remains before them."""
    while True:
        for pattern in (_UNIT_GROUP, _DEGREE, _UNIT_WORD):
            m = pattern.search(s)
            if m and m.start() > 0 and re.search(r"\d", s[: m.start()]):
                s = s[: m.start()].rstrip().rstrip("\\,;~ ").rstrip()
                break
        else:
            return s


def strip_percent(s: str) -> str:
    """Drop a trailing percent sign (`%` or `\\%`)."""
    return _PERCENT.sub("", s)


def _parse(latex: str) -> list:
    from math_verify import parse  # imported lazily: sympy + math-verify take ~1 s to import

    # `$...$` is required: without a delimiter math-verify's LaTeX extractor finds nothing in e.g. "\frac12".
    return parse(f"${latex}$", parsing_timeout=None)


def _verify(gold: list, pred: list) -> bool:
    from math_verify import verify

    return bool(verify(gold, pred, timeout_seconds=None))


def math_equal(pred: str, gold: str) -> bool:
    """True iff answer string `pred` is mathematically equivalent to `gold` (rules in the module docstring).

    Raises ValueError if `gold` is empty or math-verify can extract nothing from it (a data problem that the
    batch grader reports instead of silently scoring 0). An empty or unparseable `pred` is simply False.
    """
    gold_n = normalize_answer(gold or "")
    if not gold_n:
        raise ValueError(f"empty gold answer {gold!r}")
    pred_n = normalize_answer(pred or "")
    if not pred_n:
        return False

    # Cheapest first; each later pair is tried only if it differs from what was already compared.
    g_units, p_units = strip_units(gold_n), strip_units(pred_n)
    attempts = [(gold_n, pred_n), (g_units, p_units)]
    g_pct, p_pct = strip_percent(g_units), strip_percent(p_units)
    if (g_pct != g_units) != (p_pct != p_units):  # exactly one side carries a percent sign
        attempts.append((g_pct, p_pct))

    seen: set[tuple[str, str]] = set()
    gold_checked = False
    for g, p in attempts:
        if (g, p) in seen or not g or not p:
            continue
        seen.add((g, p))
        gold_parsed = _parse(g)
        if not gold_parsed:
            if not gold_checked:
                raise ValueError(f"math-verify cannot parse gold answer {gold!r}")
            continue
        gold_checked = True
        pred_parsed = _parse(p)
        if pred_parsed and _verify(gold_parsed, pred_parsed):
            return True
    return False
