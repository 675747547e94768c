"""`aesthetics serve` on the suite's local Ray: the HTTP API from Python, the page in headless Chromium.

One output is scored once by the batch job (tiny-random CLIP, embeddings, prompt sets, quality metrics), then
served with a token on 127.0.0.1; Serve is shut down when the module is done, so later tests get the CPUs.

Upload scores are held to the stored scores within bounds that follow from the arithmetic, not from one
machine's rounding. The upload goes through the same decoder (the same pixels: the decode is a deterministic
function of the bytes) and the same model, head and prompt code; only the batch the image is embedded in
differs (1-8 uploads here, 16 rows in the job), and CPU kernels block and sum differently by batch size, in an
order no test can pin down. So both are float32 computations of one exact score, each within the first-order
rounding bound of tests/stages/embed_rounding.py of it whatever the order of each sum, and within twice that
of each other. The bounds come from the image's pixels (the job's Decode stage on the same bytes) and the
model, heads and prompt sets the output was scored with, never from either result; the stored score within one
bound of the exact one, and the reference's quality metrics equal to the stored ones, check that the reference
has the job's pixels and model. A prompt column is one or two cosines of the unit embedding with fixed text
vectors: the unit embedding's error is bounded along those vectors' difference (so that what cancels is not
counted twice) and the products' own rounding by dot_error_bound; a best_class set may pick another class when
the classes' sums lie within their bounds of each other, and its bound then spans every class it could pick.
Worst-case bounds are loose (n u per sum where rounding typically gives sqrt(n) u): with the tiny model ~2e-2
on the LAION V2 head's score (its folded weight has norm ~18) and ~1e-3 on a prompt column, against
differences of ~1e-7; still far below what a score is read at (LAION's cut-offs are 0.5 apart; the stored
histogram is 0.25 wide).

The quality metrics need no tolerance: a row's metrics are computed by numpy on a copy of that row's own
pixels, by the same operations whatever the batch (correctly rounded elementwise operations; the 3-term luma
product of each pixel; reductions over each image's own contiguous pixels), so the served and stored values
are equal, bit for bit, on the machine that computes both (as measured for batches of 1 to 16 and shifted
buffers).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline import schema as S
from pipeline.analysis import fetch_image, open_scores
from pipeline.analysis.select import SelectOptions, embed_query, select_images
from pipeline.config import DecodeConfig, ModelConfig, ResourcesConfig, ScoreConfig
from pipeline.io.units import read_units
from pipeline.quality import QUALITY_COLUMNS
from pipeline.serve.config import ModelSpec
from tests.conftest import _free_port
from tests.tolerances import assert_within

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123456789abcdef"
QUERY = "a breathtaking travel photo of a scenic landscape"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
MAX_UPLOAD_BYTES = 2 * 2**20
MAX_UPLOAD_PIXELS = 20_000_000


@dataclass(frozen=True)
class Served:
    output: str
    url: str
    startup_seconds: float
    spec: ModelSpec  # what the model replicas load: the model, heads and prompt sets that scored the output

    def session(self, token: str | None = TOKEN):
        import requests

        session = requests.Session()
        session.trust_env = False  # no proxy from the environment for 127.0.0.1
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        return session


@pytest.fixture(scope="module")
def scored(sample_dataset, ray_local, tmp_path_factory) -> tuple[str, tuple[str, ...]]:
    """(output, weights folders the heads are found in)."""
    from pipeline.demo import v2_head_or_stand_in
    from pipeline.runner import run_score

    heads, weights_dirs = v2_head_or_stand_in(tmp_path_factory.mktemp("heads"))
    output = str(tmp_path_factory.mktemp("serve") / "scores")
    config = ScoreConfig(
        input=(sample_dataset.shards_dir,), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=heads, weights_dirs=weights_dirs, shards_per_unit=2, write_embeddings=True, prompts="default",
        decode=DecodeConfig(batch_size=16, quality_metrics=True), resources=ResourcesConfig(embed_batch_size=16))
    started = time.perf_counter()
    assert run_score(config).ok
    print(f"scoring the served output: {time.perf_counter() - started:.1f}s")
    return output, weights_dirs


@pytest.fixture(scope="module")
def served(scored) -> Served:
    from ray import serve

    from pipeline.serve.app import start
    from pipeline.serve.config import ServeConfig, plan_model

    # Small CPU requests: the suite's Ray has 2 CPUs. A long batch wait, so concurrent uploads share a batch.
    output, weights_dirs = scored
    config = ServeConfig(output=output, weights_dirs=weights_dirs, port=_free_port(), token=TOKEN, model_cpus=0.5, api_cpus=0,
                         max_upload_bytes=MAX_UPLOAD_BYTES, max_upload_pixels=MAX_UPLOAD_PIXELS,
                         max_batch_size=8, batch_wait_s=0.3)
    started = time.perf_counter()
    spec = plan_model(config)
    start(config, spec)
    try:
        yield Served(output, config.url.rstrip("/"), time.perf_counter() - started, spec)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def ok_rows(scored) -> list[dict]:
    table = open_scores(scored[0]).to_table()
    ok = table.filter(pc.equal(table[S.STATUS], "ok"))
    return sorted(ok.drop_columns([S.EMBEDDING]).to_pylist(), key=lambda r: r[S.AESTHETIC_SCORE])


def _prompt_columns(row: dict) -> list[str]:
    return [c for c in row if c.startswith("score_prompt_")]


@dataclass(frozen=True)
class Expected:
    """One image's scores as the arithmetic allows them: every float32 computation of a column lies within
    ``bounds[column]`` of ``centres[column]`` (the exact score, or the middle of a best_class set's range)."""

    centres: dict[str, float]
    bounds: dict[str, float]
    quality: dict[str, float]  # the Decode stage's metrics of the bytes


class Reference:
    """The served model's arithmetic, redone from the pixels: bounds for the scores of given image bytes."""

    def __init__(self, spec: ModelSpec) -> None:
        import torch

        from pipeline.config import DecodeConfig
        from pipeline.models.clip import image_geometry, load_clip
        from pipeline.models.heads import load_head_bank
        from pipeline.models.prompts import build_prompt_bank
        from pipeline.stages.decode import Decode
        from tests.stages.embed_rounding import Arithmetic

        # The exact scores are the fp32 model's on the CPU; the bound is that of the device the scores are made
        # on, in the precision the output records (a CUDA bound holds a CPU run too: the same terms, and more).
        model = dataclasses.replace(spec.model, device="cpu", precision="fp32")
        self.clip = load_clip(model, search_dirs=spec.weights_dirs, storage_options=dict(spec.storage_options))
        self.heads = load_head_bank(spec.heads, spec.weights_dirs, dict(spec.storage_options))
        self.prompts = build_prompt_bank(self.clip, spec.prompts) if spec.prompts is not None else None
        self.arithmetic = Arithmetic.of("cuda" if torch.cuda.is_available() else "cpu", spec.model.precision)
        self.decode = Decode(DecodeConfig(max_pixels=spec.max_pixels, quality_metrics=True),
                             *image_geometry(spec.model))
        self.head_columns = (S.AESTHETIC_SCORE,) + tuple(S.score_column(n) for n in self.heads.names[1:])
        self._done: dict[bytes, Expected] = {}

    def expected(self, images: list[bytes]) -> list[Expected]:
        from tests.stages.embed_rounding import prompt_score_bounds, score_bounds

        todo = [data for data in dict.fromkeys(images) if data not in self._done]
        if todo:
            column = np.empty(len(todo), dtype=object)
            for i, data in enumerate(todo):
                column[i] = data
            decoded = self.decode({S.IMAGE: column, S.STATUS: np.full(len(todo), "ok", dtype=object),
                                   S.ERROR: np.full(len(todo), None, dtype=object)})
            assert list(decoded[S.STATUS]) == ["ok"] * len(todo), decoded[S.ERROR]
            pixels = decoded[S.PIXELS]
            exact, bounds = score_bounds(self.clip, self.heads.heads, pixels, self.arithmetic)
            centres, halves = {}, {}
            for i, column_name in enumerate(self.head_columns):
                centres[column_name], halves[column_name] = exact[:, i], bounds[:, i]
            if self.prompts is not None:
                exact, bounds = prompt_score_bounds(self.clip, self.prompts, pixels, self.arithmetic)
                for i, column_name in enumerate(self.prompts.columns):
                    centres[column_name], halves[column_name] = exact[:, i], bounds[:, i]
            for i, data in enumerate(todo):
                self._done[data] = Expected({c: float(v[i]) for c, v in centres.items()},
                                            {c: float(v[i]) for c, v in halves.items()},
                                            {c: float(decoded[c][i]) for c in QUALITY_COLUMNS})
        return [self._done[data] for data in images]


@pytest.fixture(scope="module")
def reference(served) -> Reference:
    return Reference(served.spec)


# The API ---------------------------------------------------------------------------------------------


def test_upload_scores_equal_the_batch_jobs_and_neighbours_find_the_row(served, ok_rows, reference):
    print(f"serve startup (deploy + model load): {served.startup_seconds:.1f}s")
    # One row of each format, plus the best and the worst: concurrent, so Serve batches them.
    picked = {r[S.IMAGE_FORMAT]: r for r in ok_rows}
    picked.update({"best": ok_rows[-1], "worst": ok_rows[0]})
    rows = list(picked.values())
    uploads = [fetch_image(row) for row in rows]
    session = served.session()

    def post(data: bytes):
        started = time.perf_counter()
        response = session.post(f"{served.url}/api/score", params={"k": 5}, data=data,
                                headers={"Content-Type": "application/octet-stream"}, timeout=120)
        return response, time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
        answers = list(pool.map(post, uploads))
    started = time.perf_counter()
    expected = reference.expected(uploads)
    bounds_seconds = time.perf_counter() - started
    differences, bounds, kinds = [], [], []
    for row, (response, _), allowed in zip(rows, answers, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ok" and (body["width"], body["height"]) == (row[S.WIDTH], row[S.HEIGHT])
        assert body["scores"]["aesthetic_score"] == body["aesthetic_score"]
        assert sorted(body["scores"]) == sorted(reference.head_columns)
        prompts = _prompt_columns(row)
        assert prompts and sorted(body["prompts"]) == sorted(prompts)
        served_scores = {**body["scores"], **body["prompts"]}
        assert sorted(served_scores) == sorted(allowed.centres)
        for column, centre in allowed.centres.items():
            bound = allowed.bounds[column]
            # The job's score is one computation of the exact score, the upload's another.
            assert_within(row[column], centre, bound, f"{column} of {row[S.KEY]} as stored, against the exact score")
            assert_within(served_scores[column], row[column], 2 * bound,
                          f"{column} of {row[S.KEY]} as served, against the stored score")
            differences.append(abs(served_scores[column] - row[column]))
            bounds.append(2 * bound)
            kinds.append(column in reference.head_columns)
        for column in QUALITY_COLUMNS:  # the same numpy operations on the same pixels
            assert body["quality"][column] == row[column] == allowed.quality[column], column
        assert body["sha256"] == row[S.IMAGE_SHA256]
        # The image itself is in the output: its own row is a nearest neighbour, at cosine ~1.
        neighbours = body["neighbours"]
        assert len(neighbours) == 5 and neighbours[0]["query_similarity"] > 0.999
        assert (row[S.SHARD], row[S.KEY]) in {(n[S.SHARD], n[S.KEY]) for n in neighbours
                                              if n["query_similarity"] > 0.999}
    batches = [response.json()["batch"] for response, _ in answers]
    latencies = sorted(seconds for _, seconds in answers)
    single, seconds = post(uploads[0])
    differences, bounds, heads = np.array(differences), np.array(bounds), np.array(kinds)
    for name, which in (("heads", heads), ("prompt sets", ~heads)):
        print(f"|served - stored| {name}: largest {differences[which].max():.2e}, median "
              f"{np.median(differences[which]):.1e}; bounds {bounds[which].min():.1e} to {bounds[which].max():.1e}")
    print(f"largest share of a bound used {(differences / bounds).max():.1e}; bounds computed in "
          f"{bounds_seconds:.1f}s; batch sizes {batches}; "
          f"{len(uploads)} concurrent uploads {latencies[0]:.2f}-{latencies[-1]:.2f}s; one upload {seconds:.2f}s "
          f"(score {single.json()['seconds']['score']:.3f}s incl. the 0.3 s batch wait, neighbours "
          f"{single.json()['seconds']['neighbours']:.3f}s)")
    assert max(batches) >= 2, "concurrent uploads were not batched"


def test_search_returns_selects_picks(served, ok_rows):
    records = read_units(served.output)
    query_model = embed_query(QUERY, records)
    scores = sorted(r[S.AESTHETIC_SCORE] for r in ok_rows)
    min_score = scores[len(scores) // 3]
    session = served.session()
    for diverse in (False, True):
        response = session.get(f"{served.url}/api/search",
                               params={"q": QUERY, "k": 6, "min_score": min_score, "diverse": diverse}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = select_images(served.output, SelectOptions(QUERY, min_score=min_score, top_k=6, diverse=diverse),
                                 query_model=query_model)
        assert [r[S.KEY] for r in body["rows"]] == expected.keys
        assert body["info"]["rows_passing"] == expected.info["rows_passing"]
        assert all(r[S.AESTHETIC_SCORE] >= min_score and r["reason"] for r in body["rows"])
        assert [r["query_similarity"] for r in body["rows"]] == pytest.approx(
            expected.table["query_similarity"].to_pylist(), abs=1e-5)


def test_row_and_image_come_from_the_output_only(served, ok_rows):
    from PIL import Image

    session = served.session()
    row = ok_rows[len(ok_rows) // 2]
    ident = {"shard": row[S.SHARD], "key": row[S.KEY]}
    found = session.get(f"{served.url}/api/row", params=ident, timeout=30).json()
    assert found[S.CAPTION] == row[S.CAPTION] and found[S.AESTHETIC_SCORE] == pytest.approx(row[S.AESTHETIC_SCORE])
    assert S.EMBEDDING not in found
    image = session.get(f"{served.url}/api/image", params=ident, timeout=30)
    assert image.status_code == 200 and image.content == fetch_image(row)
    assert image.headers["content-type"].startswith("image/") and image.headers["x-content-type-options"] == "nosniff"
    thumb = session.get(f"{served.url}/api/image", params={**ident, "size": 64}, timeout=30)
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    # A shard or key no committed row names is not read, whatever it points at.
    for other in ({"shard": "/etc/passwd", "key": row[S.KEY]}, {"shard": "http://127.0.0.1:1/x.tar", "key": "0"},
                  {"shard": row[S.SHARD], "key": "no-such-key"}):
        for path in ("/api/row", "/api/image"):
            assert session.get(f"{served.url}{path}", params=other, timeout=30).status_code == 404


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")  # a few KB for tens of megapixels
    return out.getvalue()


def test_bad_requests_get_a_4xx_with_a_message(served, ok_rows):
    from PIL import Image

    jpeg = fetch_image(next(r for r in ok_rows if r[S.IMAGE_FORMAT] in ("jpg", "jpeg")))
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    session, anonymous = served.session(), served.session(token=None)
    score = f"{served.url}/api/score"
    cases = {
        "empty": (session.post(score, data=b""), 400),
        "text": (session.post(score, data=b"hello, this is not an image"), 422),
        "truncated jpeg": (session.post(score, data=jpeg[: len(jpeg) // 3]), 422),
        "tiff": (session.post(score, data=tiff.getvalue()), 415),
        "too many bytes": (session.post(score, data=b"\xff" * (MAX_UPLOAD_BYTES + 1)), 413),
        "too many pixels": (session.post(score, data=_png(5000, 5000)), 413),
        "a form": (session.post(score, files={"file": ("a.jpg", jpeg, "image/jpeg")}), 415),
        "k too large": (session.post(score, params={"k": 100000}, data=jpeg), 422),
        "bad min_score": (session.get(f"{served.url}/api/search", params={"q": "x", "min_score": "nan"}), 422),
        "blank query": (session.get(f"{served.url}/api/search", params={"q": "   "}), 422),
        "no token": (anonymous.post(score, data=jpeg), 401),
        "no token, page": (anonymous.get(f"{served.url}/"), 401),
        "no token, info": (anonymous.get(f"{served.url}/api/info"), 401),
        "wrong token": (served.session(token="x" * len(TOKEN)).get(f"{served.url}/api/info"), 401),
        "wrong token in the page url": (anonymous.get(f"{served.url}/?token=wrong", allow_redirects=False), 401),
        "another site's page": (session.post(score, data=jpeg, headers={"Origin": "http://evil.example"}), 403),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        detail = response.json()["detail"]
        assert detail, name
        print(f"{name}: {status} {str(detail)[:110]}")
    assert "pixels" in cases["too many pixels"][0].json()["detail"]
    # The server is fine after all that.
    assert session.post(score, params={"k": 0}, data=jpeg).status_code == 200


def test_every_hostile_image_gets_the_batch_jobs_verdict(served):
    """The decode stage's corpus of bad and odd images, uploaded: what the job marks ok is scored, what it
    refuses gets a 4xx naming the job's status; nothing gets a 500."""
    from pipeline.serve.app import UPLOAD_STATUS
    from tests.hostile_images import hostile_corpus

    cases = {name: case for name, case in hostile_corpus().items() if case.data is not None}
    session = served.session()

    def post(data: bytes):
        return session.post(f"{served.url}/api/score", params={"k": 0}, data=data, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(zip(cases, pool.map(post, [case.data for case in cases.values()])))
    for name, case in cases.items():
        response = answers[name]
        if case.status is S.Status.OK:
            assert response.status_code == 200, (name, response.text)
            assert (response.json()["width"], response.json()["height"]) == case.size, name
        else:
            assert response.status_code == UPLOAD_STATUS[case.status.value], (name, response.text)
            assert 400 <= response.status_code < 500
            assert response.json()["detail"].startswith(case.status.value) or case.status is S.Status.EMPTY_IMAGE


# The page ---------------------------------------------------------------------------------------------


def _browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    return playwright_api


DROP = """([name, data]) => {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
    document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
}"""


def test_page_scores_a_dropped_image_and_shows_selects_grid(served, ok_rows, reference, tmp_path):
    playwright_api = _browser()
    row = ok_rows[-1]
    upload = fetch_image(row)
    records = read_units(served.output)
    query_model = embed_query(QUERY, records)
    origin = served.url
    foreign = []
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: None if r.url.startswith((origin, "blob:", "data:")) else foreign.append(r.url))
            page.goto(f"{origin}/?token={TOKEN}")  # trades the token for a cookie
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            assert "token" not in page.url

            page.evaluate(DROP, [f"{row[S.KEY]}.jpg", base64.b64encode(upload).decode()])
            page.wait_for_selector("#score[data-score]", timeout=60_000)
            shown = float(page.get_attribute("#score", "data-score"))
            attributes = page.eval_on_selector_all("#attributes .attribute", "els => els.map(e => e.dataset.column)")
            neighbours = page.eval_on_selector_all("#neighbours figure", "els => els.map(e => e.dataset.key)")

            # Search with the slider moved: read back the value the slider took (it snaps to its step).
            page.fill("#query", QUERY)
            scores = sorted(r[S.AESTHETIC_SCORE] for r in ok_rows)
            page.eval_on_selector("#min-score", """(slider, value) => {
                slider.value = value; slider.dispatchEvent(new Event('input', {bubbles: true})); }""",
                                  str(scores[len(scores) // 4]))
            min_score = float(page.input_value("#min-score"))
            assert page.is_checked("#use-min-score")
            page.fill("#k", "8")
            page.click("#search button[type=submit]")
            page.wait_for_selector("#grid[data-state=done]", timeout=60_000)
            page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=30_000)
            grid = page.eval_on_selector_all("#grid figure", """els => els.map(e => ({key: e.dataset.key,
                score: parseFloat(e.dataset.score), text: e.innerText,
                loaded: e.querySelector('img').complete && e.querySelector('img').naturalWidth > 0}))""")
            thumbnails = page.eval_on_selector_all("img", "els => els.filter(i => i.src.includes('/api/image'))"
                                                          ".map(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)

            page.click("#grid figure >> nth=0")
            page.wait_for_selector("#row:not([hidden]) #row-table tr", timeout=30_000)
            page.wait_for_function("() => document.getElementById('row-image').naturalWidth > 0", timeout=30_000)
            row_key = page.get_attribute("#row-table tr[data-column=key]", "data-column") and \
                page.inner_text("#row-table tr[data-column=key] td:nth-child(2)")
        finally:
            browser.close()

    allowed = reference.expected([upload])[0]
    assert_within(shown, row[S.AESTHETIC_SCORE], 2 * allowed.bounds[S.AESTHETIC_SCORE], "the page's score")
    assert sorted(attributes) == sorted(_prompt_columns(row))
    assert row[S.KEY] in neighbours
    expected = select_images(served.output, SelectOptions(QUERY, min_score=min_score, top_k=8),
                             query_model=query_model)
    assert expected.keys and [g["key"] for g in grid] == expected.keys
    scores_by_key = {r[S.KEY]: r[S.AESTHETIC_SCORE] for r in ok_rows}
    for figure in grid:
        assert figure["loaded"], figure
        assert figure["score"] == pytest.approx(scores_by_key[figure["key"]], abs=1e-6)
        assert figure["score"] >= min_score
    assert thumbnails and all(thumbnails), "a thumbnail did not load"
    assert row_key == grid[0]["key"]
    assert foreign == [], "the page fetched from another origin"
    screenshot = os.environ.get("AESTHETICS_SERVE_SCREENSHOT")
    if screenshot:  # how docs/serve.png is made: 256 colours keep it small enough to commit
        from PIL import Image

        with Image.open(tmp_path / "serve.png") as shot:
            shot.convert("RGB").quantize(256).save(screenshot, optimize=True)
