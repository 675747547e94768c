"""The served application: the page and the HTTP API over one scored output.

Routes (JSON unless said; every error is ``{"detail": "..."}`` with a 4xx for anything the client can fix):

* ``GET /``: the page (``static/index.html``, its script and stylesheet; nothing loaded from elsewhere).
* ``POST /api/score?k=12&min_score=``: the body is an image's bytes. Its scores (every head), prompt attribute
  profile and quality metrics, computed by the batch job's stages, and its ``k`` nearest neighbours among
  the output's ok rows scoring >= ``min_score`` (by the stored embeddings).
* ``GET /api/search?q=...&min_score=&k=&diverse=``: ranked rows with their scores and reasons, i.e.
  :func:`pipeline.analysis.select.select_images` with the query embedded by the served model.
* ``GET /api/row?shard=&key=``: one committed row (all its columns but the embedding).
* ``GET /api/image?shard=&key=[&size=N]``: the row's image, one ranged read of its shard; ``size`` returns a
  JPEG thumbnail (longest side N) instead of the stored bytes.
* ``GET /api/info``: the model, heads, prompt sets, limits.

Safety: the proxy listens on loopback unless told otherwise, and then every request needs the token (a
``Bearer`` header, or the cookie the page gets by opening ``/?token=...``). Requests whose ``Origin`` is
another site are refused (a page elsewhere cannot drive a loopback server through the user's browser).
Uploads are capped in bytes before they are read and in pixels before they are decoded, by the batch job's
decoder. Images are only ever read from rows of the output: a shard named in a request must be one the
committed rows name, and no URL a user gives is fetched.
"""

# No `from __future__ import annotations`: the ingress class is defined in build_application and pickled to
# its replica by value, with only the globals its code names; FastAPI must find the routes' parameter types
# (Request, Query defaults) as objects, not as names to look up there.
import asyncio
import collections
import hmac
import io
import math
import threading
import time
import urllib.parse
from importlib import resources
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from pipeline import schema as S
from pipeline.errors import BusyError
from pipeline.serve.config import MAX_K, MAX_QUERY_CHARS, ModelSpec, ServeConfig
from pipeline.serve.model import ScoringModel

COOKIE = "aesthetics_token"
DEFAULT_K = 12
ROW_CACHE = 20_000  # image references of rows recently returned, so thumbnails need no table lookup
MIN_THUMB, MAX_THUMB = 32, 1024
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/static/page.css": ("page.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's URL
    "X-Frame-Options": "DENY",
}
# The upload's status in the batch job's vocabulary -> the HTTP status that says whose fault it is.
UPLOAD_STATUS = {
    S.Status.IMAGE_TOO_LARGE.value: 413,
    S.Status.UNSUPPORTED_FORMAT.value: 415,
    S.Status.DECODE_ERROR.value: 422,
    S.Status.EMPTY_IMAGE.value: 400,
    S.Status.NO_IMAGE.value: 400,
    S.Status.SCORE_ERROR.value: 422,
}
IMAGE_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
               "GIF": "image/gif", "BMP": "image/bmp"}
_ROW_REF_COLUMNS = [S.SHARD, S.KEY, S.OFFSET, S.SIZE, S.IMAGE_FORMAT]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def image_path(shard: str, key: str, size: int | None = None) -> str:
    query = {"shard": shard, "key": key}
    if size:
        query["size"] = str(size)
    return "/api/image?" + urllib.parse.urlencode(query)


def rows_json(table: pa.Table, thumb: int = 256) -> list[dict[str, Any]]:
    """Rows as JSON objects (no embedding), each with the paths of its image and thumbnail."""
    columns = [c for c in table.column_names if c != S.EMBEDDING]
    rows = []
    for row in table.select(columns).to_pylist():
        row = _jsonable(row)
        row["image"] = image_path(row[S.SHARD], row[S.KEY])
        row["thumbnail"] = image_path(row[S.SHARD], row[S.KEY], thumb)
        rows.append(row)
    return rows


def thumbnail_jpeg(data: bytes, size: int, max_pixels: int) -> bytes:
    """A JPEG of longest side ``size``; the bytes are opened by the guarded opener (format and pixel checks)."""
    from PIL import ImageOps

    from pipeline.images import open_image

    with open_image(data, max_pixels) as image:
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def image_type(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only
            return IMAGE_TYPES.get(image.format or "")
    except Exception:
        return None


class RowRefs:
    """(shard, key) -> where its image lies, for the rows recently sent to a client (LRU, thread-safe)."""

    def __init__(self, capacity: int = ROW_CACHE) -> None:
        self._rows: collections.OrderedDict[tuple[str, str], dict[str, Any]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def add(self, rows: list[Mapping[str, Any]]) -> None:
        with self._lock:
            for row in rows:
                self._rows[(row[S.SHARD], row[S.KEY])] = {c: row.get(c) for c in _ROW_REF_COLUMNS}
                self._rows.move_to_end((row[S.SHARD], row[S.KEY]))
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)

    def get(self, shard: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._rows.get((shard, key))


def find_rows(output: str, shard: str, key: str, storage_options: Mapping[str, Any] | None,
              columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The committed rows with this shard and key (the shard and key are filter values, never opened).
    A fallback for rows no recent answer listed: the filter is pushed down to the Parquet statistics, but it
    is still a scan of the snapshot's files (the row-id index of a very large output would belong here)."""
    from pipeline.analysis import open_scores

    dataset = open_scores(output, storage_options)
    wanted = columns or [c for c in dataset.schema.names if c != S.EMBEDDING]
    table = dataset.to_table(columns=wanted, filter=(pads.field(S.SHARD) == shard) & (pads.field(S.KEY) == key))
    rows = table.to_pylist()
    rows.sort(key=lambda r: r.get(S.STATUS) != S.Status.OK.value)  # an ok row first
    return rows


def build_application(config: ServeConfig, spec: ModelSpec, gpus: float) -> Any:
    """The Serve application: the API ingress bound to the model deployment."""
    from ray import serve

    from pipeline.analysis.reading import fetch_image
    from pipeline.analysis.select import QueryModel, SelectionError, SelectOptions, select_images

    # No /docs: FastAPI's documentation page loads its script from a CDN.
    api = FastAPI(title="aesthetics serve", docs_url=None, redoc_url=None, openapi_url=None)
    storage = dict(config.storage_options)
    token = config.token

    def _authorised(request: Request) -> bool:
        supplied = request.headers.get("authorization", "")
        supplied = supplied[7:] if supplied.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        return bool(supplied) and hmac.compare_digest(supplied.encode(), token.encode())

    @api.middleware("http")
    async def guard(request: Request, call_next):
        origin = request.headers.get("origin")
        if origin and origin != "null" and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
            return JSONResponse({"detail": f"cross-origin request from {origin} refused"}, status_code=403)
        if token is not None and not _authorised(request):
            offered = request.query_params.get("token")
            if request.url.path == "/" and offered and hmac.compare_digest(offered.encode(), token.encode()):
                # Trade the URL's token for a cookie, and drop it from the address bar.
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
                return response
            return JSONResponse({"detail": "a token is required: an 'Authorization: Bearer <token>' header, or "
                                           "open the page as /?token=<token>"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def read_upload(request: Request) -> bytes:
        if request.headers.get("content-type", "").startswith("multipart/"):
            raise HTTPException(415, "send the image's bytes as the request body (Content-Type: image/...), "
                                     "not as a form")
        limit = config.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise HTTPException(400, f"bad Content-Length {declared!r}")
            if int(declared) > limit:
                raise HTTPException(413, f"the upload is {int(declared)} bytes, over the limit of {limit}")
        chunks, total = [], 0
        async for chunk in request.stream():  # counted as it arrives: a body without a length cannot run past it
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"the upload is over the limit of {limit} bytes")
            chunks.append(chunk)
        if total == 0:
            raise HTTPException(400, "empty upload: POST the image's bytes as the request body")
        return b"".join(chunks)

    def selection_error(error: SelectionError) -> HTTPException:
        return HTTPException(409, str(error))

    @serve.deployment(name="api", max_ongoing_requests=256)
    @serve.ingress(api)
    class Api:
        def __init__(self, model) -> None:
            self.model = model
            self.refs = RowRefs()
            self._info: dict[str, Any] | None = None

        async def _model_info(self) -> dict[str, Any]:
            if self._info is None:
                self._info = await self.model.info.remote()
            return self._info

        async def _query_model(self, embedding: np.ndarray) -> QueryModel:
            info = await self._model_info()
            embedding = np.asarray(embedding, dtype=np.float32)
            return QueryModel(info["model"], spec.model, embedding / max(float(np.linalg.norm(embedding)), 1e-12))

        async def _select(self, options: SelectOptions, query: QueryModel) -> tuple[list[dict[str, Any]], dict]:
            try:
                selection = await asyncio.to_thread(select_images, config.output, options, storage_options=storage,
                                                    query_model=query)
            except SelectionError as error:
                raise selection_error(error) from None
            rows = rows_json(selection.table)
            self.refs.add(rows)
            return rows, _jsonable(selection.info)

        @api.get("/")
        @api.get("/static/page.js")
        @api.get("/static/page.css")
        def page(self, request: Request) -> Response:
            name, media_type = STATIC[request.url.path]
            body = resources.files("pipeline.serve").joinpath("static", name).read_bytes()
            return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

        @api.get("/api/info")
        async def info(self) -> dict[str, Any]:
            return {**await self._model_info(), "output": config.output, "max_upload_bytes": config.max_upload_bytes,
                    "max_upload_pixels": config.max_upload_pixels, "max_k": MAX_K,
                    "token_required": config.token_required, "score_range": spec.score_range}

        @api.post("/api/score")
        async def score(self, request: Request, k: int = Query(DEFAULT_K, ge=0, le=MAX_K),
                        min_score: float | None = Query(None, ge=-1e6, le=1e6)) -> dict[str, Any]:
            data = await read_upload(request)
            started = time.perf_counter()
            result = await self.model.score.remote(data)
            scored = time.perf_counter()
            if result["status"] != S.Status.OK.value:
                raise HTTPException(UPLOAD_STATUS.get(result["status"], 422),
                                    f"{result['status']}: {result['error']}")
            neighbours, info = [], {}
            if k:
                query = await self._query_model(result.pop("embedding"))
                try:
                    neighbours, info = await self._select(
                        SelectOptions(query=f"image sha256:{result['sha256'][:16]}", min_score=min_score, top_k=k),
                        query)
                except HTTPException as error:  # e.g. an output without embeddings: the scores still stand
                    info = {"error": error.detail}
            result.pop("embedding", None)
            return _jsonable({**result, "aesthetic_score": result["scores"][S.AESTHETIC_SCORE],
                              "model": (await self._model_info())["model"], "neighbours": neighbours,
                              "neighbour_info": info,
                              "seconds": {"score": scored - started, "neighbours": time.perf_counter() - scored}})

        @api.get("/api/search")
        async def search(self, q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
                         k: int = Query(DEFAULT_K * 2, ge=1, le=MAX_K),
                         min_score: float | None = Query(None, ge=-1e6, le=1e6),
                         diverse: bool = False) -> dict[str, Any]:
            if not q.strip():
                raise HTTPException(422, "the query must not be blank")
            query = await self._query_model(await self.model.embed_text.remote(q))
            rows, info = await self._select(SelectOptions(query=q, min_score=min_score, top_k=k, diverse=diverse),
                                            query)
            return {"query": q, "rows": rows, "info": info}

        @api.get("/api/row")
        async def row(self, shard: str = Query(..., min_length=1, max_length=4096),
                      key: str = Query(..., max_length=4096)) -> dict[str, Any]:
            rows = await asyncio.to_thread(find_rows, config.output, shard, key, storage)
            if not rows:
                raise HTTPException(404, f"no committed row with shard {shard!r} and key {key!r}")
            found = rows_json(pa.Table.from_pylist(rows[:1]))[0]
            self.refs.add([found])
            return found

        @api.get("/api/image")
        async def image(self, shard: str = Query(..., min_length=1, max_length=4096),
                        key: str = Query(..., max_length=4096),
                        size: int | None = Query(None, ge=MIN_THUMB, le=MAX_THUMB)) -> Response:
            ref = self.refs.get(shard, key)
            if ref is None:
                rows = await asyncio.to_thread(find_rows, config.output, shard, key, storage, _ROW_REF_COLUMNS)
                if not rows:
                    raise HTTPException(404, f"no committed row with shard {shard!r} and key {key!r}")
                ref = rows[0]
                self.refs.add([ref])
            if ref.get(S.OFFSET) is None or ref.get(S.SIZE) is None:
                raise HTTPException(404, f"row {key!r} has no image in its shard")
            try:
                data = await asyncio.to_thread(fetch_image, ref, storage)
            except (OSError, ValueError) as error:
                raise HTTPException(502, f"cannot read the image from {shard}: {error}") from None
            headers = {"Cache-Control": "private, max-age=3600"}
            if size:
                from pipeline.images import ImageRejected

                try:
                    thumb = await asyncio.to_thread(thumbnail_jpeg, data, size, spec.max_pixels)
                except ImageRejected as error:
                    raise HTTPException(422, f"the stored image cannot be shown: {error}") from None
                return Response(thumb, media_type="image/jpeg", headers=headers)
            media_type = image_type(data)
            if media_type is None:  # never let a browser guess: it could render the bytes as a page
                return Response(data, media_type="application/octet-stream",
                                headers={**headers, "Content-Disposition": "attachment"})
            return Response(data, media_type=media_type, headers=headers)

    threads = None if gpus else max(1, int(round(config.model_cpus)))
    model = ScoringModel.options(
        num_replicas=config.model_replicas,
        ray_actor_options={"num_cpus": config.model_cpus, "num_gpus": gpus},
    ).bind(spec, config.max_batch_size, config.batch_wait_s, threads)
    return Api.options(ray_actor_options={"num_cpus": config.api_cpus}).bind(model)


def model_gpus(config: ServeConfig) -> float:
    """GPUs per model replica: as asked, else one when the cluster has any."""
    import ray

    if config.model_gpus is not None:
        return config.model_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def start(config: ServeConfig, spec: ModelSpec | None = None) -> Any:
    """Deploy on the connected Ray; returns the ingress handle once every replica is up."""
    from ray import serve

    from pipeline.serve.config import plan_model

    spec = spec or plan_model(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    # Serve keeps the HTTP options of its first start on a cluster and only logs a warning for new ones: the
    # proxy could be listening on another address than the one asked for (and printed).
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (config.host, config.port):
        raise BusyError(f"Serve already runs on this Ray cluster, listening on {running.host}:{running.port}: "
                        f"serve with --host {running.host} --port {running.port}, or stop it (`serve shutdown`)")
    return serve.run(build_application(config, spec, model_gpus(config)), name=config.app_name, route_prefix="/")
