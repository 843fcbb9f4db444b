"""A real OpenAI-compatible HTTP server on loopback for tests and benchmarks, with fault injection.

Serves /v1/chat/completions and /v1/completions from a thread per connection. Answers are
deterministic functions of the prompt. Faults are rules matched against the prompt text and
consumed in order: HTTP 429 with Retry-After, 500, slow answers (client timeouts), malformed JSON,
empty lists, plain numbered lists, prose around JSON. Every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VOCAB = ["red colour", "round outline", "striped texture", "small size", "sharp corners", "thin border",
         "glossy surface", "dark shadow", "bright highlight", "curved edge", "pointed tip", "flat shading",
         "rough brush strokes", "pencil lines", "white background", "blue tint", "grainy noise", "soft blur"]


@dataclass
class Fault:
    kind: str  # "429", "500", "slow", "malformed", "empty", "numbered", "prose", "drop", "odd_shapes"
    match: str | None = None  # substring of the prompt; None matches every request
    times: int = 1  # how many matching requests it applies to (-1: all)
    retry_after: float | None = None  # for 429
    delay_s: float = 5.0  # for "slow"


@dataclass
class Logged:
    path: str
    prompt: str
    body: dict
    status: int
    t: float
    headers: dict = field(default_factory=dict)


def prompt_text(body: dict) -> str:
    if "messages" in body:
        return "\n".join(m.get("content", "") for m in body["messages"])
    return body.get("prompt", "")


_SUBJECT = re.compile(r'(?:of an?|spot an?|sets an?|identify an?|distinguish an?|in the ")\s*'
                      r'([^"():]+?)"?(?: \(| image:| in a photo| apart| from|:| style)')


def subject(prompt: str) -> str:
    """The class or domain a rendered prompt asks about: few-shot prompts name it on their last line."""
    found = _SUBJECT.findall(prompt.strip().splitlines()[-1]) or _SUBJECT.findall(prompt)
    return found[0].strip() if found else "thing"


def attributes_for(prompt: str, n: int = 5) -> list[str]:
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    picked = [VOCAB[(h >> (5 * i)) % len(VOCAB)] for i in range(n)]
    return list(dict.fromkeys([f"{subject(prompt)} shaped silhouette"] + picked))[:n]


class FakeLLMServer:
    def __init__(self, latency_s: float = 0.0, accepts: tuple[str, ...] = ("json_schema", "json_object"),
                 n_attributes: int = 5):
        self.latency_s = latency_s
        self.accepts = accepts  # response_format types it honours; others get HTTP 500 like llama.cpp's
        self.n_attributes = n_attributes
        self.faults: list[Fault] = []
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- control --------------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def _take_fault(self, prompt: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times != 0 and (f.match is None or f.match in prompt):
                    if f.times > 0:
                        f.times -= 1
                    return f
        return None

    def requests_for(self, needle: str) -> list[Logged]:
        return [r for r in self.log if needle in r.prompt]

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeLLMServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm
                # and the peer's delayed ACK add ~40 ms to every response, as no real server does.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):  # /stats: the request count, for callers in another process
                server._send(self, 200, {"requests": len(server.log)})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server._handle(self, body)

        class Server(ThreadingHTTPServer):
            # socketserver's listen backlog is 5: a burst of connections overflows it, the kernel
            # drops the SYNs, and their clients retry a second later (1.24 s latencies measured at
            # --concurrency 16). Real servers listen with a deep backlog (uvicorn: 2048).
            request_queue_size = 1024

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- serving ----------------------------------------------------------------------------------
    def _send(self, h, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def _handle(self, h, body: dict) -> None:
        prompt = prompt_text(body)
        fault = self._take_fault(prompt)
        status = 200
        rf = (body.get("response_format") or {}).get("type")
        if rf and rf not in self.accepts:
            status = 500
        elif fault and fault.kind in ("429", "500"):
            status = int(fault.kind)
        with self._lock:
            self.log.append(Logged(h.path, prompt, body, status, time.time(),
                                   {k.lower(): v for k, v in h.headers.items()}))
        if self.latency_s:
            time.sleep(self.latency_s)
        if status == 500 and rf and rf not in self.accepts:
            return self._send(h, 500, {"error": {"message": f"response_format type '{rf}' is not supported"}})
        if status == 429:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return self._send(h, 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, headers)
        if status == 500:
            return self._send(h, 500, {"error": {"message": "internal error"}})
        if fault and fault.kind == "slow":
            time.sleep(fault.delay_s)
        if fault and fault.kind == "drop":
            h.close_connection = True
            return
        attrs = attributes_for(prompt, self.n_attributes)
        kind = fault.kind if fault else None
        if kind == "malformed":
            content = '{"attributes": ["' + attrs[0] + '", "' + attrs[1]  # cut off mid-JSON
        elif kind == "empty":
            content = '{"attributes": []}' if h.path.endswith("chat/completions") else ""
        elif kind == "numbered":
            content = "\n".join(f"{i}. {a}" for i, a in enumerate(attrs, 1))
        elif kind == "prose":
            content = "Sure! Here you go:\n```json\n" + json.dumps({"attributes": attrs}) + "\n```\nHope it helps."
        elif h.path.endswith("chat/completions"):
            content = json.dumps({"attributes": attrs}) if rf else "; ".join(attrs)
        else:
            content = " " + "; ".join(attrs)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                 "total_tokens": len(prompt.split()) + len(content.split())}
        if kind == "odd_shapes":  # what some servers send: content as parts, token counts that are not integers
            usage = {"prompt_tokens": "12", "completion_tokens": 3.5, "total_tokens": None}
            content = [{"type": "text", "text": content[:5]}, {"type": "text", "text": content[5:]}]
        if h.path.endswith("chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        self._send(h, 200, {"id": "cmpl-test", "object": obj, "created": int(time.time()),
                            "model": body.get("model", "test"), "choices": [choice], "usage": usage})


def main() -> None:
    """Serve from a process of its own (benchmarks: no GIL shared with the client under test)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--port-file", required=True, help="where to write the port once listening")
    args = ap.parse_args()
    server = FakeLLMServer(latency_s=args.latency).start()
    with open(args.port_file, "w") as fh:
        fh.write(str(server._httpd.server_address[1]))
    threading.Event().wait()


if __name__ == "__main__":
    main()
