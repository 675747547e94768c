"""moto's S3 server on 127.0.0.1, run in the bench's own process so that the bench can fill its buckets
directly and say how long the server itself took to answer.

Filling: moto stores about 140 objects a second through HTTP PUTs, so an input of 232,000 shards with their
sidecars (696,000 objects) would take hours to upload; :meth:`S3Server.put` writes into moto's backend, which
stores them as a PUT would (same keys, same MD5 ETags) in seconds. The commands timed against the server reach
it over HTTP only.

Accounting: moto answers a LIST request by collecting and sorting every key in the bucket, so one page costs
time in proportion to the bucket (0.8 s at 232,000 objects, against milliseconds at 4,000); S3 answers a page
in time that does not depend on the bucket's size. :meth:`S3Server.served` counts the requests of each kind
and the seconds the server spent in them, so that a figure measured here can be read with and without the
part that is this server's own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Iterable
from urllib.parse import parse_qs


class S3Server:
    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        app = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()
        self._seconds: defaultdict[str, float] = defaultdict(float)

        def counted(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            started = time.perf_counter()
            body = list(app(environ, start_response))  # the response is made while it is consumed
            kind = request_kind(environ)
            with self._lock:
                self._count[kind] += 1
                self._seconds[kind] += time.perf_counter() - started
            return body

        self._server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def create_bucket(self, bucket: str) -> None:
        self._backend().create_bucket(bucket, "us-east-1")

    def put(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Store objects (key -> bytes) as PUTs would, without HTTP."""
        backend = self._backend()
        for key, data in objects.items():
            backend.put_object(bucket, key, data)

    def served(self) -> dict[str, tuple[int, float]]:
        """kind -> (requests answered, seconds spent answering them), since the server started."""
        with self._lock:
            return {kind: (self._count[kind], self._seconds[kind]) for kind in self._count}

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()

    @staticmethod
    def _backend() -> Any:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def request_kind(environ: dict[str, Any]) -> str:
    """LIST (a GET of a bucket: a listing page), GET, PUT, HEAD, DELETE or POST, as path-style requests name them."""
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "").strip("/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if method == "GET" and "/" not in path and ("list-type" in query or "prefix" in query or not query):
        return "LIST"
    return method


def difference(after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    """What the server answered between two :meth:`S3Server.served` readings."""
    out = {}
    for kind, (count, seconds) in after.items():
        count_before, seconds_before = before.get(kind, (0, 0.0))
        if count > count_before:
            out[kind] = (count - count_before, seconds - seconds_before)
    return out
