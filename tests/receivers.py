"""Webhook receivers for tests: real HTTP servers on 127.0.0.1 that answer as told and keep
what they were sent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Self

#: What a receiver does with its nth delivery (counting from 1).
Answer = Literal["ok", "fail", "hang"]


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answer: Answer


class Receiver:
    """`answer(n)` says what to do with the nth delivery. A hanging one is held until
    `release` (or the receiver closes) and then succeeds, so the test decides when it ends."""

    def __init__(self, answer: Callable[[int], Answer] = lambda _: "ok") -> None:
        self._answer = answer
        self._received: list[Received] = []
        self._changed = threading.Condition()
        self._released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/imagegen?token=s3cret"

    def set_answer(self, answer: Callable[[int], Answer]) -> None:
        self._answer = answer

    def received(self) -> list[Received]:
        with self._changed:
            return list(self._received)

    def wait_for(self, count: int, timeout_s: float = 60.0) -> list[Received]:
        """The first `count` deliveries, once they have arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._received) >= count, timeout_s):
                raise AssertionError(
                    f"the receiver got {len(self._received)} of {count} deliveries in {timeout_s}s"
                )
            return list(self._received[:count])

    def wait_until(
        self, enough: Callable[[list[Received]], bool], timeout_s: float = 60.0
    ) -> list[Received]:
        """Every delivery so far, once `enough` of them holds."""
        with self._changed:
            if not self._changed.wait_for(lambda: enough(self._received), timeout_s):
                raise AssertionError(
                    f"the receiver's {len(self._received)} deliveries never sufficed"
                )
            return list(self._received)

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._changed:
                    answer = receiver._answer(len(receiver._received) + 1)
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    receiver._received.append(Received(headers, body, answer))
                    receiver._changed.notify_all()
                if answer == "hang":
                    receiver._released.wait()
                # A released hang answers as a success: the attempt ends once, and nothing is
                # retried behind the test's back.
                self.send_response(503 if answer == "fail" else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        return Handler
