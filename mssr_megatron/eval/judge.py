"""An LLM judge through an OpenAI-compatible chat-completions endpoint (SGLang or vLLM serving the judge model).

What the judge sees follows the authors' evaluation (evaluation/utils/async_judge.py, model_parser_qwen.py and
eval_templates.py in the released code): the question (the benchmark's `question_for_eval` where it has one), the gold
answer and the model's whole response; the judge extracts the final answer and decides whether it agrees with the gold,
equal values in other notations or units counting as agreement, option text counting as its letter. The authors ask
twice (an extraction call, then a 0/1 scoring call on the extraction); here one request does both and the reply ends
in two fixed lines that `parse_verdict` reads strictly. The authors drop a sample whose judge calls all fail; here it
keeps its rule grade, flagged (grading.py).

Client: standard library only. `judge.concurrency` requests in flight (a thread pool), `timeout_s` per connect/read,
`retries` extra attempts with doubling backoff (from `backoff_s`) after a timeout, connection error, HTTP 429/5xx or a
malformed reply (not JSON, no choices[0].message.content, no verdict lines); other HTTP errors fail at once. One probe
(GET {url}/models) first, and again after a request that timed out or could not connect on every attempt: an
endpoint that does not answer it fails the remaining samples at once instead of costing (retries + 1) x timeout_s each
(a slow but live judge answers the probe and keeps being asked). Judgements are cached in
cache_dir/judge_cache.jsonl, one line per reply, keyed by a hash of (model, prompt): a rerun asks only for what is
missing.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from urllib.parse import urlsplit

from mssr_megatron.eval.config import JudgeConfig
from mssr_megatron.eval.types import EvalSample

__all__ = ["JUDGE_CACHE_FILE", "JudgeClient", "JudgeError", "JudgeOutcome", "MalformedReply", "Verdict",
           "build_judge_prompt", "judge_responses", "parse_verdict"]

log = logging.getLogger("mssr")

JUDGE_CACHE_FILE = "judge_cache.jsonl"
_LETTERS = "ABCDEFGHIJ"


@dataclass
class Verdict:
    """A parsed judgement."""

    extracted: str | None
    """The final answer the judge found in the response (None: it found none)."""
    correct: bool


@dataclass
class JudgeOutcome:
    """The judge's answer for one response: a verdict, or the error that left it without one."""

    verdict: Verdict | None
    reply: str | None = None
    """The judge's reply text (the last one received, also when it was malformed)."""
    error: str | None = None
    """'<kind>: <detail>' when verdict is None; kind is timeout, connection, http_<status>, malformed or unreachable."""
    cached: bool = False


class JudgeError(Exception):
    """One failed judge request. kind: timeout, connection, http_<status>, malformed, unreachable."""

    def __init__(self, kind: str, detail: str, *, retryable: bool, reply: str | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.retryable, self.reply = kind, retryable, reply
        self.attempts = 1
        """Requests made for this prompt before giving up (set by JudgeClient.ask)."""


class MalformedReply(ValueError):
    """A judge reply without the verdict lines the prompt asks for."""


# --- prompt and reply ---------------------------------------------------------------------------------------------

_INSTRUCTIONS = """\
Work in two steps.
1. Find the final answer the response commits to (a boxed answer, else its stated conclusion). If it gives no \
final answer, or several different ones, the final answer is NONE.
2. Decide whether that final answer agrees with the reference answer. The same value in another notation or unit \
agrees (1/2 and 0.5; 50 cm and 0.5 m). A different, partial, approximate or hedged answer does not.{choice_rule}

You may reason briefly first. End your reply with exactly these two lines and nothing after them:
EXTRACTED: <the final answer, or NONE>
VERDICT: CORRECT or VERDICT: INCORRECT"""

_CHOICE_RULE = (" This is a multiple-choice question and the reference is an option letter: an answer that gives an"
                " option's text instead of its letter names that option; naming several options does not agree.")


def build_judge_prompt(sample: EvalSample, response: str) -> str:
    """The one user message sent for (sample, response): question, options (choice questions), reference, response,
    and the reply format `parse_verdict` reads."""
    question = str(sample.meta.get("question_for_eval") or sample.question)
    parts = ["You are checking a model's answer to a benchmark question about an image (the image is not shown;"
             " judge from the text).", f"### Question\n{question}"]
    if sample.answer_type == "choice" and sample.choices:
        parts.append("### Options\n" + "\n".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(sample.choices)))
    parts += [f"### Reference answer\n{sample.answer}", f"### Model response\n{response}",
              "### Task\n" + _INSTRUCTIONS.format(choice_rule=_CHOICE_RULE if sample.answer_type == "choice" else "")]
    return "\n\n".join(parts)


_EXTRACTED_LINE = re.compile(r"^EXTRACTED:\s*(?P<answer>.*?)\s*$", re.IGNORECASE)
_VERDICT_LINE = re.compile(r"^VERDICT:\s*(?P<verdict>CORRECT|INCORRECT)\s*\.?$", re.IGNORECASE)


def parse_verdict(reply: str) -> Verdict:
    """Read the two final lines of a judge reply ("EXTRACTED: X" then "VERDICT: CORRECT|INCORRECT"; keywords in any
    case, markdown bold ignored; X = NONE means no answer). Raises MalformedReply for anything else."""
    lines = [ln.replace("**", "").strip() for ln in reply.splitlines()]
    lines = [ln for ln in lines if ln]
    extracted = _EXTRACTED_LINE.match(lines[-2]) if len(lines) >= 2 else None
    verdict = _VERDICT_LINE.match(lines[-1]) if lines else None
    if extracted is None or verdict is None:
        raise MalformedReply(f"the reply does not end in 'EXTRACTED: ...' / 'VERDICT: CORRECT|INCORRECT': "
                             f"{reply[-200:]!r}")
    answer = extracted.group("answer")
    return Verdict(extracted=None if answer.upper() in ("", "NONE") else answer,
                   correct=verdict.group("verdict").upper() == "CORRECT")


# --- cache --------------------------------------------------------------------------------------------------------

def cache_key(model: str, prompt: str) -> str:
    """sha256 of (model, prompt): a judgement is reused only for the same judge model and the same prompt."""
    return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()


class _ReplyCache:
    """Replies that parsed, in cache_dir/judge_cache.jsonl ({"key", "model", "reply"} per line), appended as they
    arrive so a killed evaluation keeps them. A torn last line (killed mid-write) is ignored."""

    def __init__(self, cache_dir: str | None):
        self.path = os.path.join(cache_dir, JUDGE_CACHE_FILE) if cache_dir else None
        self.replies: dict[str, str] = {}
        self._lock = threading.Lock()
        self._torn = False  # the file ends in a torn line: the next entry starts on a new line
        if self.path and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    self._torn = not line.endswith("\n")
                    try:
                        entry = json.loads(line)
                        self.replies[entry["key"]] = entry["reply"]
                    except (ValueError, KeyError, TypeError):
                        continue

    def put(self, key: str, model: str, reply: str) -> None:
        with self._lock:
            self.replies[key] = reply
            if self.path:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n" * self._torn + json.dumps({"key": key, "model": model, "reply": reply}) + "\n")
                self._torn = False


# --- client -------------------------------------------------------------------------------------------------------

class JudgeClient:
    """Chat-completions requests to cfg.url with cfg's timeout, retries and bearer token. Thread-safe (a fresh
    connection per request)."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.url:
            raise ValueError("judge.url is not set; set it to the judge endpoint's base URL, e.g. http://host:30000/v1")
        parts = urlsplit(cfg.url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"judge.url {cfg.url!r} is not an http(s) URL like http://host:30000/v1")
        self.cfg = cfg
        self._https = parts.scheme == "https"
        self._host, self._port, self._base = parts.hostname, parts.port, parts.path
        self._headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            token = os.environ.get(cfg.api_key_env)
            if not token:
                raise ValueError(f"judge.api_key_env names {cfg.api_key_env}, which is not set in the environment; "
                                 f"export it, or set judge.api_key_env=null for an endpoint without a key")
            self._headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.cfg.timeout_s)
        try:
            conn.request(method, self._base + path, body=body, headers=self._headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except TimeoutError as e:  # socket.timeout is TimeoutError since Python 3.10
            raise JudgeError("timeout", f"no reply within {self.cfg.timeout_s}s", retryable=True) from e
        except (OSError, http.client.HTTPException) as e:
            raise JudgeError("connection", f"{type(e).__name__}: {e}", retryable=True) from e
        finally:
            conn.close()

    def probe(self) -> str | None:
        """One GET {url}/models: None if the endpoint answers (any HTTP status), else why not."""
        try:
            self._request("GET", "/models", None)
        except JudgeError as e:
            return f"GET {self.cfg.url.rstrip('/')}/models failed ({e})"
        return None

    def ask_once(self, prompt: str) -> tuple[str, Verdict]:
        """One request: the reply text and its verdict. Raises JudgeError."""
        body = json.dumps({"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.cfg.max_tokens}).encode()
        status, data = self._request("POST", "/chat/completions", body)
        if status != 200:
            text = data[:200].decode("utf-8", "replace")
            raise JudgeError(f"http_{status}", text, retryable=status == 429 or status >= 500)
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError("malformed", f"not a chat completion ({type(e).__name__}: {e}): "
                             f"{data[:200].decode('utf-8', 'replace')!r}", retryable=True) from e
        try:
            return content, parse_verdict(content)
        except MalformedReply as e:
            raise JudgeError("malformed", str(e), retryable=True, reply=content) from e

    def ask(self, prompt: str) -> tuple[str, Verdict, int]:
        """Ask with retries: (reply, verdict, attempts made). Raises the last JudgeError, with .attempts set."""
        attempts = 1 + max(0, self.cfg.retries)
        for attempt in range(attempts):
            try:
                reply, verdict = self.ask_once(prompt)
                return reply, verdict, attempt + 1
            except JudgeError as e:
                if not e.retryable or attempt == attempts - 1:
                    e.attempts = attempt + 1
                    raise
                time.sleep(self.cfg.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def judge_responses(samples: Sequence[EvalSample], responses: Sequence[str], cfg: JudgeConfig,
                    cache_dir: str | None, *, progress: bool = True) -> list[JudgeOutcome]:
    """Judge responses[i] against samples[i]; one JudgeOutcome per response, in order. Logs one summary line."""
    client = JudgeClient(cfg)
    cache = _ReplyCache(cache_dir)
    prompts = [build_judge_prompt(s, r) for s, r in zip(samples, responses)]
    keys = [cache_key(cfg.model, p) for p in prompts]
    outcomes: list[JudgeOutcome | None] = [None] * len(prompts)
    for i, key in enumerate(keys):
        if key in cache.replies:
            try:
                outcomes[i] = JudgeOutcome(parse_verdict(cache.replies[key]), cache.replies[key], cached=True)
            except MalformedReply:  # written by another version of the parser: ask again
                pass
    todo = [i for i, o in enumerate(outcomes) if o is None]
    failures: Counter[str] = Counter()
    requests = 0
    # Why the endpoint is down: said by the probe before the first request, or by a re-probe after a request that
    # timed out or could not connect on every attempt. Once set, the remaining prompts fail without a request.
    down: list[str] = []
    if todo and (why := client.probe()) is not None:
        down.append(why)

    def ask(i: int) -> tuple[int, JudgeOutcome, int]:
        if down:
            return i, JudgeOutcome(None, error=f"unreachable: {down[0]}"), 0
        try:
            reply, verdict, attempts = client.ask(prompts[i])
        except JudgeError as e:
            if e.kind in ("timeout", "connection") and not down and (why := client.probe()) is not None:
                down.append(why)
            return i, JudgeOutcome(None, reply=e.reply, error=f"{e} (after {e.attempts} attempt(s))"), e.attempts
        cache.put(keys[i], cfg.model, reply)
        return i, JudgeOutcome(verdict, reply), attempts

    if todo:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="judge") as pool:
            futures = [pool.submit(ask, i) for i in todo]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="judge", disable=not progress):
                i, outcome, attempts = fut.result()
                outcomes[i], requests = outcome, requests + attempts
                if outcome.error:
                    failures[outcome.error.split(":", 1)[0]] += 1  # the JudgeError kind, or 'unreachable'
    done = [o for o in outcomes if o is not None]
    n_cached = sum(o.cached for o in done)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(failures.items()))
    log.info("judge %s: %d responses, %d cached, %d asked (%d requests), %d failed%s", cfg.url, len(prompts),
             n_cached, len(todo), requests, sum(failures.values()), f" ({reasons})" if reasons else "")
    return done
