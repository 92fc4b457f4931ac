"""Pulling the final answer out of a model response.

Rules (shared by every reward so that they agree on what "the answer" is):

* The answer is the content of the LAST top-level ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces, so
  ``\\boxed{\\frac{1}{2}}`` works; escaped ``\\{``/``\\}`` do not count as braces), or the token after
  ``\\boxed `` (``\\boxed 5``).
* If the last box is malformed (unclosed brace, ``\\boxed`` at the very end) or empty, there is NO answer: a
  truncated final box usually means the response hit the length limit, and falling back to an earlier box or
  to an answer line would reward the truncated rollout.
* Only when the response has no box at all, the last line containing "answer: X" or "the answer is X"
  (case-insensitive) supplies X.

Gold answers: datasets store some as ``<answer>X</answer>``; ``gold_answer`` takes X (the released grader strips
these tags from the gold answer too). A response's own ``<answer>`` tags play no part: its answer is its box.
"""

from __future__ import annotations

import re

__all__ = [
    "extract_answer", "extract_boxed", "extract_answer_line", "extract_choice_letter", "gold_answer",
    "strip_math_delimiters",
]

# `(?![A-Za-z])` so that e.g. `\boxedfoo` (another macro) is not taken for a box.
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_ARGUMENT = re.compile(r"[^\s$]+")  # `\boxed 5`: the run of non-space characters after the command
_MALFORMED = object()  # sentinel: a box command whose argument could not be read


def _last_box(text: str) -> str | None | object:
    """Content of the last top-level box; None if there is no box; _MALFORMED if the last one is broken."""
    last: str | None | object = None
    pos = 0
    pairs: dict[int, int] | None = None
    while (m := _BOX_CMD.search(text, pos)) is not None:
        j = m.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            if pairs is None:
                pairs = _brace_pairs(text)  # once per text: matching each box again would be quadratic
            end = pairs.get(j)
            if end is None:  # unclosed: everything after it is inside the box, so it is the last one
                return _MALFORMED
            last = text[j + 1 : end]
            pos = end + 1  # skip the content, so nested boxes belong to the outer (top-level) one
        elif j > m.end() and j < len(text) and text[j] not in "\\$":
            # `\boxed 5`: TeX takes one token as the argument; we take the run of non-space characters.
            tok = _BARE_ARGUMENT.match(text, j)  # at j, not on a copy of the rest: linear in many boxes
            assert tok is not None
            last = tok.group(0).rstrip(".,;:")
            pos = tok.end()
        else:
            last = _MALFORMED
            pos = m.end()
    return last


def strip_math_delimiters(s: str) -> str:
    """Remove surrounding whitespace and one layer of `$...$`, `$$...$$`, `\\(...\\)` or `\\[...\\]`."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its closing `}` (unclosed ones left out), in one pass. A backslash escapes the
    next character, so `\\{`, `\\}` and `\\\\` never pair; this keeps `\\boxed{\\left\\{ x \\right.}` and
    `\\boxed{\\{1,2\\}}` intact."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _unwrap_boxes(s: str) -> str:
    """`\\boxed{\\boxed{5}}` -> `5`: peel boxes whose argument is the whole string.

    Linear in len(s) however deep the nesting: the braces are matched once, and each peel only moves the window's
    ends (re-matching and slicing per layer took 16.8 s for 10k nested boxes)."""
    pairs: dict[int, int] | None = None
    lo, hi = 0, len(s)
    while (m := _BOX_CMD.match(s, lo, hi)) is not None:
        j = m.end()
        while j < hi and s[j].isspace():
            j += 1
        if j >= hi or s[j] != "{":
            break
        if pairs is None:
            pairs = _brace_pairs(s)
        end = pairs.get(j)
        if end is None or end >= hi or s[end + 1 : hi].strip():
            break
        lo, hi = j + 1, end
        while lo < hi and s[lo].isspace():
            lo += 1
        while hi > lo and s[hi - 1].isspace():
            hi -= 1
    return s[lo:hi]


def extract_boxed(response: str) -> str | None:
    """Return the stripped content of the last top-level `\\boxed{}`/`\\fbox{}`/`\\boxed X`, or None.

    None means: no box, an empty box, or a malformed (unclosed / argument-less) last box.
    """
    box = _last_box(response)
    if not isinstance(box, str):
        return None
    box = _unwrap_boxes(strip_math_delimiters(box))
    return box or None


# "answer: X", "Final answer: X", "The answer is X", "the final answer is: X". Markdown bold is removed first.
_ANSWER_LINE = re.compile(
    r"(?:\bthe\s+(?:final\s+)?answer\s+is\b\s*:?|\banswer\s*:)\s*(?P<ans>\S.*)", re.IGNORECASE
)


def extract_answer_line(response: str) -> str | None:
    """Return X from the last line of the form "answer: X" / "The answer is X" (case-insensitive), or None."""
    for line in reversed(response.splitlines()):
        line = line.replace("**", "").replace("__", "")
        matches = list(_ANSWER_LINE.finditer(line))
        if not matches:
            continue
        ans = matches[-1].group("ans").strip()
        # A sentence-final period is punctuation, not part of the answer ("The answer is 5.").
        ans = re.sub(r"[.;,]+$", "", ans).strip()
        ans = strip_math_delimiters(ans)
        return ans or None
    return None


_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def gold_answer(answer: str) -> str:
    """A gold answer without `<answer>...</answer>` tags: the content of the last tagged span when there is one
    ("<answer> 3 </answer>" -> "3"), else the answer as it is."""
    spans = _ANSWER_TAGS.findall(answer or "")
    return spans[-1].strip() if spans else answer


def extract_answer(response: str) -> str | None:
    """Return the final answer string of `response` (see module docstring for the rules), or None."""
    if not response:
        return None
    box = _last_box(response)
    if box is _MALFORMED:
        return None
    if box is not None:
        return extract_boxed(response)
    return extract_answer_line(response)


# --- multiple choice -------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJ"
# `\text{B}`, `\textbf{(B)}`, `\mathrm{B}` ... -> their content.
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textrm|texttt|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_PREFIX = re.compile(r"^(?:(?:the\s+)?(?:correct\s+)?(?:option|choice|answer)\s*(?:is\s*)?:?\s*)+", re.IGNORECASE)
# A lone letter, optionally "(B)", "B)", "B.", "(B)." : the only shape where lower case is accepted.
_LONE = re.compile(r"^\(?\s*([A-Ja-j])\s*\)?\s*\.?$")
# An upper-case letter followed by its option text: "B: 42", "B. 42", "(B) 42", "B) 42".
_WITH_TEXT = re.compile(r"^(?:\(\s*([A-J])\s*\)\s*[:.]?|([A-J])\s*[:.)])\s*(\S.*)$")


def extract_choice_letter(text: str | None) -> str | None:
    """Map an answer string to one upper-case option letter A-J, or None if it is not exactly one letter.

    Accepts "B", "b", "(B)", "B)", "B.", "option B", "\\text{B}", "B: 42", "(B) 42". Lower case is only
    accepted for a lone letter ("b", "(b)"), since in "a: 42" or "a cat" a lower-case letter is ambiguous.
    Several letters ("A, C", "A and B", "AB") give None.
    """
    if not text:
        return None
    s = strip_math_delimiters(text)
    for _ in range(3):  # nested macros such as \textbf{\text{B}}
        s = _TEXT_MACRO.sub(r"\1", s)
    s = _PREFIX.sub("", s.strip()).strip()
    s = strip_math_delimiters(s)
    m = _LONE.match(s)
    if m:
        return m.group(1).upper()
    m = _WITH_TEXT.match(s)
    if m:
        rest = m.group(3)
        # "A. B" / "A) (C)": the "option text" is itself another letter, i.e. two answers.
        if _LONE.match(rest.strip()) and rest.strip().upper() == rest.strip():
            return None
        return m.group(1) or m.group(2)
    return None
