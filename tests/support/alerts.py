"""Usage-alert test kit: the tiny model's tokens per "x", a scripted local webhook receiver, signature checks."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKENS_PER_X = 3  # "x" is [CLS] x [SEP] for the tiny model


class Receiver:
    """A real HTTP server on a loopback port answering from a script: an int is a status, ``"hang"`` sleeps
    past the relay's timeout; the script's last entry repeats."""

    def __init__(self, script: list[int | str]) -> None:
        self.script = script
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                step = outer.script[min(len(outer.received), len(outer.script)) - 1]
                if step == "hang":
                    time.sleep(1.0)
                    step = 200  # too late: the relay has given up on this attempt
                self.send_response(int(step))
                self.end_headers()
                with_body = b"ok"
                self.wfile.write(with_body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, headers: dict[str, str], body: bytes) -> None:
    fields = dict(part.split("=", 1) for part in headers["modelmeter-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
