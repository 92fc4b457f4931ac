"""Rule-based grading of benchmark responses (eval/grading.py), on hand-made cases per benchmark kind.

Expected grades are worked by hand from the rules in grading.py's docstring: MathVista multiple choice (letters,
option text), MathVista/MathVerse free form (math-verify equivalences), HallusionBench yes/no.
"""

from __future__ import annotations

import pytest

from mssr_megatron.eval.config import JudgeConfig
from mssr_megatron.eval.grading import grade_responses, grade_rule
from mssr_megatron.eval.types import EvalSample


def _sample(answer: str, answer_type: str, choices: list[str] | None = None, benchmark: str = "b") -> EvalSample:
    return EvalSample(benchmark=benchmark, sample_id="1", question="q", answer=answer, answer_type=answer_type,
                      images=[], choices=choices or [])


# MathVista testmini pid-style multiple choice: "What fraction of the shape is blue?" options 3/11, 8/11, 6/11, 3/5.
MATHVISTA_CHOICE = _sample("B", "choice", ["3/11", "8/11", "6/11", "3/5"], benchmark="mathvista")


@pytest.mark.parametrize("response, extracted, correct", [
    ("<think>count</think> \\boxed{B}", "B", True),
    ("\\boxed{(B)}", "B", True),
    ("\\boxed{B.}", "B", True),
    ("\\boxed{B: 8/11}", "B", True),
    ("\\boxed{\\text{B}}", "B", True),
    ("The fraction is eight elevenths.\nThe answer is (B).", "B", True),   # no box: the answer line
    ("\\boxed{8/11}", "B", True),                                          # the option's text
    ("\\boxed{ 8/11 }", "B", True),
    ("\\boxed{3/5}", "D", False),                                          # another option's text
    ("\\boxed{C}", "C", False),
    ("\\boxed{A, B}", "A, B", False),                                      # two letters: no option
    ("\\boxed{7/11}", "7/11", False),                                      # no option's text
    ("I cannot tell from the picture.", None, False),                      # no final answer
    ("\\boxed{B", None, False),                                            # truncated box
])
def test_mathvista_choice(response, extracted, correct):
    grade = grade_rule(MATHVISTA_CHOICE, response)
    assert (grade.extracted, grade.correct, grade.method) == (extracted, correct, "rule")


def test_choice_gold_given_as_option_text_is_mapped_and_a_gold_that_is_no_option_is_refused():
    assert grade_rule(_sample("8/11", "choice", ["3/11", "8/11"]), "\\boxed{B}").correct
    with pytest.raises(ValueError, match=r"b/1: gold answer '5/11'.*not an option letter"):
        grade_rule(_sample("5/11", "choice", ["3/11", "8/11"]), "\\boxed{B}")


@pytest.mark.parametrize("gold, response, extracted, correct", [
    ("yes", "\\boxed{Yes}", "yes", True),
    ("Yes", "\\boxed{yes.}", "yes", True),
    ("no", "\\boxed{\\text{No}}", "no", True),
    ("no", "Looking closely, the answer is No, it is not.", "no", True),
    ("yes", "\\boxed{no}", "no", False),
    ("yes", "\\boxed{yes or no}", "yes or no", False),      # both words: no answer
    ("no", "\\boxed{maybe}", "maybe", False),
    ("no", "The image is unclear.", None, False),
    ("no", "\\boxed{nothing}", "nothing", False),           # 'no' inside a word does not count
])
def test_hallusionbench_yes_no(gold, response, extracted, correct):
    grade = grade_rule(_sample(gold, "yes_no", benchmark="hallusionbench"), response)
    assert (grade.extracted, grade.correct) == (extracted, correct)


@pytest.mark.parametrize("gold, response, extracted, correct", [
    ("0.5", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "so \\boxed{0.5}", "0.5", True),
    ("\\sqrt{12}", "\\boxed{2\\sqrt{3}}", "2\\sqrt{3}", True),
    ("60", "\\boxed{60^\\circ}", "60^\\circ", True),
    ("0.5", "\\boxed{50\\%}", "50\\%", True),
    ("14", "The answer is 14.", "14", True),
    ("5", "\\boxed{3}", "3", False),
    ("0.5", "\\boxed{0.55}", "0.55", False),
    ("Angry", "\\boxed{angry}", "angry", True),              # a word gold (ChartQA): compared as text
    ("Angry", "\\boxed{Happy}", "Happy", False),
    ("TCGA", "\\boxed{AGCT}", "AGCT", False),              # math-verify alone says equal (a product of symbols)
    ("Red Car", "\\boxed{red  car.}", "red  car.", True),
    ("5", "no final answer here", None, False),
    ("5", "\\boxed{}", None, False),
])
def test_mathverse_free_form(gold, response, extracted, correct):
    grade = grade_rule(_sample(gold, "free_form", benchmark="mathverse"), response)
    assert (grade.extracted, grade.correct) == (extracted, correct)


def test_unknown_answer_type_is_an_error_naming_the_kinds():
    with pytest.raises(ValueError, match="unknown answer_type 'essay'.*free_form, choice, yes_no"):
        grade_rule(_sample("x", "essay"), "\\boxed{x}")


def test_grade_responses_without_judge_is_rule_only():
    samples = [MATHVISTA_CHOICE, _sample("yes", "yes_no"), _sample("0.5", "free_form")]
    grades = grade_responses(samples, ["\\boxed{B}", "\\boxed{No}", "\\boxed{1/2}"], JudgeConfig(url=None), None)
    assert [(g.method, g.correct) for g in grades] == [("rule", True), ("rule", False), ("rule", True)]
    with pytest.raises(ValueError, match="3 samples but 2 responses"):
        grade_responses(samples, ["a", "b"], JudgeConfig(), None)


def test_a_free_form_answer_that_hangs_sympy_is_wrong_after_the_time_limit_not_a_hang(monkeypatch):
    import time

    from mssr_megatron.eval import grading

    # rewards/grader.py's pathological case: math-verify never returns on this tower against 5
    monkeypatch.setattr(grading, "GRADE_TIMEOUT_S", 3.0)
    samples = [_sample("5", "free_form"), _sample("0.5", "free_form"), _sample("yes", "yes_no")]
    start = time.monotonic()
    grades = grade_responses(samples, ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{\\frac{1}{2}}", "\\boxed{yes}"],
                             JudgeConfig(url=None), None)
    assert time.monotonic() - start < 30
    assert (grades[0].correct, grades[0].extracted) == (False, "9^{9^{9^{9^{9}}}}")
    assert "timeout" in grades[0].error
    assert [(g.correct, g.error) for g in grades[1:]] == [(True, None), (True, None)]
