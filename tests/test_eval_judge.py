"""The LLM-judge path (eval/judge.py through grading.grade_responses) against a chat-completions server process on
loopback (tests/judge_server.py): verdicts, retries, a timeout, malformed replies, the cache, the concurrency bound,
a dead endpoint. Each request's behaviour is set by a `[[judge:MODE]]` marker in the model response."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from mssr_megatron.eval.config import JudgeConfig
from mssr_megatron.eval.grading import grade_responses
from mssr_megatron.eval.judge import (
    JUDGE_CACHE_FILE,
    MalformedReply,
    build_judge_prompt,
    judge_responses,
    parse_verdict,
)
from mssr_megatron.eval.types import EvalSample

SERVER = os.path.join(os.path.dirname(__file__), "judge_server.py")


def start_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, SERVER], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("PORT "), f"judge server did not start: {line!r}"
    return proc, int(line.split()[1])


@pytest.fixture(scope="module")
def server_port():
    proc, port = start_server()
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _call(port: int, method: str, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, body=b"" if method == "POST" else None)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


@pytest.fixture
def port(server_port):
    """The server's port, its stats cleared and no request of an earlier test still running."""
    deadline = time.monotonic() + 5
    while _call(server_port, "GET", "/stats")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    _call(server_port, "POST", "/reset")
    return server_port


def stats(port: int) -> dict:
    return _call(port, "GET", "/stats")


def judge_cfg(port: int, **kw) -> JudgeConfig:
    # A timeout far above the loopback reply time (the machine may be busy); the timeout tests set a short one.
    base = JudgeConfig(url=f"http://127.0.0.1:{port}/v1", model="judge-test", concurrency=4, timeout_s=2.0,
                       retries=2, backoff_s=0.01)
    return replace(base, **kw)


def free_form(sample_id: str, answer: str = "5") -> EvalSample:
    return EvalSample(benchmark="mathverse", sample_id=sample_id, question=f"question {sample_id}", answer=answer,
                      answer_type="free_form", images=[])


def test_verdicts_are_used_and_yes_no_stays_rule(port, monkeypatch):
    monkeypatch.setenv("JUDGE_TOKEN", "sekrit")
    samples = [free_form("a"), free_form("b"),
               EvalSample(benchmark="hallusionbench", sample_id="c", question="Is it red?", answer="yes",
                          answer_type="yes_no", images=[])]
    responses = ["\\boxed{5} [[judge:incorrect]]", "\\boxed{7} [[judge:correct]]", "\\boxed{Yes}"]
    grades = grade_responses(samples, responses, judge_cfg(port, api_key_env="JUDGE_TOKEN"), None)
    # The judge overrules the rule grade both ways (rule: a correct, b wrong); the yes/no question is not sent.
    assert [(g.method, g.correct, g.extracted) for g in grades] == [
        ("judge", False, "judged"), ("judge", True, "judged"), ("rule", True, "yes")]
    assert grades[0].judge_reply.endswith("VERDICT: INCORRECT") and grades[0].error is None
    assert stats(port)["requests"] == 2 and stats(port)["auth"] == "Bearer sekrit"


def test_a_named_but_unset_token_variable_is_a_clear_error(port, monkeypatch):
    monkeypatch.delenv("JUDGE_TOKEN_UNSET", raising=False)
    with pytest.raises(ValueError, match="JUDGE_TOKEN_UNSET, which is not set"):
        grade_responses([free_form("a")], ["x"], judge_cfg(port, api_key_env="JUDGE_TOKEN_UNSET"), None)


@pytest.mark.parametrize("mode, retries, method, requests, error", [
    ("fail=500*2", 2, "judge", 3, None),                   # two 500s, then an answer on the third attempt
    ("fail=429*1", 2, "judge", 2, None),
    ("fail=503*2", 1, "rule_fallback", 2, "http_503: "),   # retries exhausted
    ("fail=400*9", 3, "rule_fallback", 1, "http_400: "),   # a client error is not retried
])
def test_http_errors_are_retried_when_transient(port, mode, retries, method, requests, error):
    grade, = grade_responses([free_form("a")], [f"\\boxed{{5}} [[judge:{mode}]]"], judge_cfg(port, retries=retries),
                             None)
    assert grade.method == method and stats(port)["requests"] == requests
    if error is None:
        assert grade.error is None and grade.extracted == "judged"
    else:  # the rule grade stands, flagged, with the reason and the attempts made
        assert grade.error.startswith(error) and grade.error.endswith(f"(after {requests} attempt(s))")
        assert (grade.extracted, grade.correct) == ("5", True)


def test_timeout_falls_back_to_the_rule_grade_flagged(port, caplog):
    caplog.set_level(logging.INFO, logger="mssr")
    start = time.monotonic()
    grade, = grade_responses([free_form("a")], ["\\boxed{5} [[judge:slow=2]]"],
                             judge_cfg(port, timeout_s=0.4, retries=1), None)
    elapsed = time.monotonic() - start
    assert (grade.method, grade.correct, grade.extracted) == ("rule_fallback", True, "5")
    assert grade.error == "timeout: no reply within 0.4s (after 2 attempt(s))"
    assert stats(port)["requests"] == 2
    assert elapsed < 1.9, elapsed  # two 0.4 s timeouts, not one of the server's 2 s replies
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("judge http://")]
    assert summary == [f"judge http://127.0.0.1:{port}/v1: 1 responses, 0 cached, 1 asked (2 requests), "
                       "1 failed (timeout 1)"]


@pytest.mark.parametrize("mode, detail", [
    ("malformed", "does not end in 'EXTRACTED"),
    ("notjson", "not a chat completion (JSONDecodeError"),
    ("nochoices", "not a chat completion (KeyError"),
])
def test_malformed_replies_are_retried_then_fall_back(port, mode, detail):
    grade, = grade_responses([free_form("a")], [f"\\boxed{{6}} [[judge:{mode}]]"], judge_cfg(port, retries=2), None)
    assert (grade.method, grade.correct) == ("rule_fallback", False)
    assert grade.error.startswith("malformed: ") and detail in grade.error
    assert grade.error.endswith("(after 3 attempt(s))")
    assert stats(port)["requests"] == 3
    # The malformed text is kept for the report when there was a chat completion to read it from.
    assert grade.judge_reply == ("I believe the answer is probably right." if mode == "malformed" else None)


def test_judgements_are_cached_and_a_rerun_does_not_ask_again(port, tmp_path):
    samples = [free_form("a"), free_form("b"), free_form("c")]
    responses = ["\\boxed{5} [[judge:correct]]", "\\boxed{1} [[judge:incorrect]]", "\\boxed{5} [[judge:malformed]]"]
    cfg = judge_cfg(port, retries=0)
    first = grade_responses(samples, responses, cfg, str(tmp_path))
    assert stats(port)["requests"] == 3
    assert len((tmp_path / JUDGE_CACHE_FILE).read_text().splitlines()) == 2  # the malformed reply is not kept
    _call(port, "POST", "/reset")
    with open(tmp_path / JUDGE_CACHE_FILE, "a") as f:  # a line torn by a killed run is ignored
        f.write('{"key": "0f')
    outcomes = judge_responses(samples, responses, cfg, str(tmp_path), progress=False)
    assert [o.cached for o in outcomes] == [True, True, False]
    assert stats(port)["requests"] == 1  # only the failed one is asked again
    # An answer written after the torn line is read back on its own line.
    fixed = ["\\boxed{5} [[judge:correct]] now"]
    judge_responses(samples[2:], fixed, cfg, str(tmp_path), progress=False)
    assert judge_responses(samples[2:], fixed, cfg, str(tmp_path), progress=False)[0].cached
    again = grade_responses(samples, responses, cfg, str(tmp_path))
    assert [(g.method, g.correct) for g in again] == [(g.method, g.correct) for g in first]
    # Another judge model is another key: everything is asked again.
    _call(port, "POST", "/reset")
    grade_responses(samples, responses, replace(cfg, model="other-judge"), str(tmp_path))
    assert stats(port)["requests"] == 3


def test_no_more_than_concurrency_requests_in_flight(port):
    samples = [free_form(str(i)) for i in range(8)]
    grades = grade_responses(samples, [f"\\boxed{{5}} [[judge:hold=1.0]] {i}" for i in range(8)],
                             judge_cfg(port, concurrency=3), None)
    assert all(g.method == "judge" for g in grades)
    assert stats(port)["requests"] == 8 and stats(port)["max_in_flight"] == 3


def test_a_dead_endpoint_falls_back_at_once_after_one_probe():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    start = time.monotonic()
    grades = grade_responses([free_form(str(i)) for i in range(20)], ["\\boxed{5}"] * 20,
                             judge_cfg(dead, timeout_s=0.5, retries=3, backoff_s=0.5), None)
    # not 20 x (4 attempts + 3.5 s of backoff) / 4 in flight = 17.5 s; the bound leaves room for the rule grading's
    # worker processes to start on a loaded machine
    assert time.monotonic() - start < 10.0
    assert {g.method for g in grades} == {"rule_fallback"} and all(g.correct for g in grades)
    assert grades[0].error.startswith(f"unreachable: GET http://127.0.0.1:{dead}/v1/models failed (connection: ")


def test_the_judge_sees_the_eval_question_the_gold_and_the_whole_response():
    sample = EvalSample(benchmark="mathvista", sample_id="7", question="Which? Choices: (A) 3 (B) 4", answer="B",
                        answer_type="choice", images=[], choices=["3", "4"],
                        meta={"question_for_eval": "Which one is it?"})
    prompt = build_judge_prompt(sample, "<think>long</think> \\boxed{4}")
    assert "### Question\nWhich one is it?\n" in prompt and "Choices:" not in prompt
    assert "### Options\n(A) 3\n(B) 4\n" in prompt and "### Reference answer\nB\n" in prompt
    assert "### Model response\n<think>long</think> \\boxed{4}\n" in prompt
    assert "option's text instead of its letter" in prompt
    assert "option's text" not in build_judge_prompt(free_form("a"), "\\boxed{5}")


def test_an_endpoint_that_dies_mid_run_fails_the_rest_at_once():
    proc, port = start_server()
    try:
        responses = ["\\boxed{5} [[judge:correct]]", "\\boxed{5} [[judge:die]]"]
        responses += [f"\\boxed{{5}} {i}" for i in range(8)]
        start = time.monotonic()
        grades = grade_responses([free_form(str(i)) for i in range(10)], responses,
                                 judge_cfg(port, concurrency=1, retries=3, backoff_s=0.1), None)
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert grades[0].method == "judge"
    assert grades[1].method == "rule_fallback" and grades[1].error.startswith("connection: ")
    assert grades[1].error.endswith("(after 4 attempt(s))")
    assert all(g.method == "rule_fallback" and g.error.startswith("unreachable: GET ") for g in grades[2:])
    assert elapsed < 3.5, elapsed  # the dying request's 4 attempts (0.7 s of backoff), not 9 x that


@pytest.mark.parametrize("reply, extracted, correct", [
    ("EXTRACTED: 1/2\nVERDICT: CORRECT", "1/2", True),
    ("The response ends with 0.5, which is 1/2.\n\n**EXTRACTED:** 0.5\n**VERDICT:** CORRECT\n", "0.5", True),
    ("extracted: B\nverdict: incorrect.", "B", False),
    ("EXTRACTED: NONE\nVERDICT: INCORRECT", None, False),
])
def test_parse_verdict(reply, extracted, correct):
    verdict = parse_verdict(reply)
    assert (verdict.extracted, verdict.correct) == (extracted, correct)


@pytest.mark.parametrize("reply", [
    "CORRECT",
    "1",                                                   # the authors' bare 0/1 is not this prompt's format
    "VERDICT: CORRECT\nEXTRACTED: 5",                      # lines swapped
    "EXTRACTED: 5\nVERDICT: CORRECT\nHope this helps!",    # text after the verdict
    "EXTRACTED: 5\nVERDICT: PARTIALLY CORRECT",
    "",
])
def test_parse_verdict_rejects_anything_else(reply):
    with pytest.raises(MalformedReply):
        parse_verdict(reply)
