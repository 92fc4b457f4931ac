"""A small OpenAI-compatible chat-completions server for the judge tests (run as a process: `python judge_server.py`).

It listens on 127.0.0.1, port 0 (any free one), and prints "PORT <n>" on stdout once it accepts connections.
Each POST {base}/chat/completions behaves as the first `[[judge:MODE]]` marker in its messages says (the tests put it
in the model response, which the judge prompt quotes); without a marker it answers CORRECT:
    correct / incorrect     "EXTRACTED: judged" + "VERDICT: CORRECT|INCORRECT"
    slow=S                  sleep S seconds, then as correct
    hold=S                  as slow (used to keep requests in flight together)
    malformed               a chat completion whose content has no verdict lines
    notjson                 HTTP 200 with a body that is not JSON
    nochoices               HTTP 200 JSON without "choices"
    fail=CODE*N             the first N requests with this prompt get HTTP CODE, later ones as correct
    die                     the server process exits at once (an endpoint that goes down mid-run)
GET {base}/models answers a model list (the client's probe). GET /stats: {"requests": total chat requests,
"max_in_flight": most chat requests handled at once, "in_flight": now, "by_prompt": {sha256 of the prompt:
count}, "auth": the last Authorization header}. POST /reset clears the stats.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_MARKER = re.compile(r"\[\[judge:([^\]]+)\]\]")


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Clear the counts; requests still running (a slow one a test gave up on) stay counted in flight."""
        self.requests = 0
        self.max_in_flight = self.in_flight
        self.by_prompt: Counter[str] = Counter()
        self.auth: str | None = None


STATE = _State()


def _completion(content: str) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": "judge-test",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: the tests read /stats instead
        pass

    _counted = False  # this connection's chat request is counted in flight

    def _leave(self) -> None:
        """Stop counting the chat request in flight: before its response is written, since a client that has the
        response may send its next request before this thread runs again (it would be counted twice at once)."""
        if self._counted:
            self._counted = False
            with STATE.lock:
                STATE.in_flight -= 1

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self._leave()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj).encode())

    def do_GET(self) -> None:
        if self.path == "/stats":
            with STATE.lock:
                self._json(200, {"requests": STATE.requests, "max_in_flight": STATE.max_in_flight,
                                 "in_flight": STATE.in_flight,
                                 "by_prompt": dict(STATE.by_prompt), "auth": STATE.auth})
        elif self.path.endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "judge-test", "object": "model"}]})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/reset":
            with STATE.lock:
                STATE.reset()
            self._json(200, {"ok": True})
            return
        if not self.path.endswith("/chat/completions"):
            self._json(404, {"error": f"no route {self.path}"})
            return
        request = json.loads(body)
        prompt = "\n".join(m["content"] for m in request["messages"])
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        with STATE.lock:
            STATE.requests += 1
            STATE.in_flight += 1
            STATE.max_in_flight = max(STATE.max_in_flight, STATE.in_flight)
            STATE.by_prompt[digest] += 1
            seen = STATE.by_prompt[digest]
            STATE.auth = self.headers.get("Authorization")
            self._counted = True
        try:
            self._answer(_MARKER.search(prompt), seen)
        finally:
            self._leave()  # no response written (the process is exiting, or an error)

    def _answer(self, marker: re.Match | None, seen: int) -> None:
        mode = marker.group(1) if marker else "correct"
        name, _, arg = mode.partition("=")
        if name == "die":
            os._exit(0)
        if name in ("slow", "hold"):
            time.sleep(float(arg))
            name = "correct"
        if name == "fail":
            code, times = arg.split("*")
            if seen <= int(times):
                self._json(int(code), {"error": {"message": f"injected HTTP {code}"}})
                return
            name = "correct"
        if name in ("correct", "incorrect"):
            self._json(200, _completion(f"The response concludes judged.\nEXTRACTED: judged\n"
                                        f"VERDICT: {name.upper()}"))
        elif name == "malformed":
            self._json(200, _completion("I believe the answer is probably right."))
        elif name == "notjson":
            self._send(200, b"<html>gateway error</html>", "text/html")
        elif name == "nochoices":
            self._json(200, {"object": "chat.completion", "error": "no choices here"})
        else:
            self._json(400, {"error": f"unknown test mode {mode!r}"})


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
