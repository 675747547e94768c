"""An HTTP proxy on 127.0.0.1 in front of the moto server that fails chosen requests on purpose.

Storage faults cannot be asked of moto itself, and stopping it would lose its in-memory buckets, so
the proxy answers for it: a rule names a method and a path pattern, what to do (a 503 SlowDown, a
500 InternalError, or dropping the connection without a reply) and how many times (``None``: always).
Everything else is forwarded unchanged, Host header included, so SigV4 requests stay valid.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = "slow_down"
INTERNAL_ERROR = "internal_error"
DROP_CONNECTION = "drop_connection"

_ERROR_REPLIES = {
    SLOW_DOWN: (503, "SlowDown", "Please reduce your request rate."),
    INTERNAL_ERROR: (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class FaultRule:
    method: str
    path_pattern: str
    fault: str
    times: int | None = None  # None: every matching request fails
    served: int = 0

    def take(self, method: str, path: str) -> bool:
        if method != self.method or not re.search(self.path_pattern, path):
            return False
        if self.times is not None and self.served >= self.times:
            return False
        self.served += 1
        return True


class FaultyS3Proxy:
    """``with FaultyS3Proxy(moto_endpoint) as proxy: proxy.endpoint`` is the URL to give s3fs."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.rules: list[FaultRule] = []
        self.forwarded = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def fail(self, method: str, path_pattern: str, fault: str, times: int | None = None) -> FaultRule:
        rule = FaultRule(method, path_pattern, fault, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def heal(self) -> None:
        with self._lock:
            self.rules.clear()

    def __enter__(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, method: str, path: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule.take(method, path):
                    return rule.fault
            self.forwarded += 1
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._fault_for(self.command, urlsplit(self.path).path)
                if fault == DROP_CONNECTION:
                    self.close_connection = True
                    return
                if fault is not None:
                    status, code, message = _ERROR_REPLIES[fault]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    reply = upstream.getresponse()
                    payload = reply.read()
                finally:
                    upstream.close()
                self.send_response(reply.status, reply.reason)
                for name, value in reply.getheaders():
                    # A HEAD reply's Content-Length is the object's size, not that of this (empty) body.
                    if name.lower() not in _HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
