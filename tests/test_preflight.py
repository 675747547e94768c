"""The driver's checks before a run: weights pinned and load-checked, the precision as it will run, the
output apart from the input. (Each failure's message and exit code through the CLI: test_cli_errors.py.)"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from pipeline.config import HeadSpec, ModelConfig, ScoreConfig, WeightsSpec
from pipeline.demo import random_v2_head
from pipeline.errors import OutputError, WeightsError
from pipeline.planning import model_key, run_identity
from pipeline.preflight import check_output_location, prepare_run
from tests.conftest import TEST_ARCH
from tests.tarfiles import make_tar


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    (folder / "00000.tar").write_bytes(make_tar([("0000.jpg", b"not looked at before the run")]))
    return str(folder)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> HeadSpec:
    path, digest = random_v2_head(tmp_path_factory.mktemp("head"))
    return HeadSpec("random-v2", WeightsSpec(path, digest))


def _config(shards: str, output: Path, head: HeadSpec, **model) -> ScoreConfig:
    return ScoreConfig(input=(shards,), output=str(output), model=ModelConfig(**model), heads=(head,))


def test_fp16_asked_on_cpu_runs_and_is_recorded_as_fp32(shards, head, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.preflight"):
        prepared = prepare_run(_config(shards, tmp_path / "out", head, name="tiny-random", device="cpu",
                                       precision="fp16"))
    assert (prepared.config.model.precision, prepared.requested_precision) == ("fp32", "fp16")
    assert "running and recording fp32" in caplog.text
    identity = run_identity(prepared.config, 1, prepared.requested_precision)
    assert identity["precision"] == identity["clip"]["precision"] == "fp32"
    assert identity["precision_requested"] == "fp16" and "/fp32|" in identity["model_key"]
    # How the pixels were made, so that a served upload is decoded the same way.
    assert identity["decode"] == {"fast": True, "apply_exif_orientation": True}


def test_the_readme_says_what_the_run_records_for_fp16_on_a_cpu():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = readme.split("**Precision as it ran.**", 1)[1].split("\n- ", 1)[0]
    # What the test above pins, as the README puts it.
    assert "fp16 on a CPU runs in fp32" in paragraph and "record `fp32`" in paragraph
    assert "`precision_requested`" in paragraph


def test_bf16_on_cpu_is_kept_and_is_another_model_key(shards, head, tmp_path):
    keys = {precision: model_key(prepare_run(_config(shards, tmp_path / "out", head, name="tiny-random",
                                                     device="cpu", precision=precision)).config)
            for precision in ("fp32", "bf16")}
    assert keys["bf16"].replace("/bf16|", "/fp32|") == keys["fp32"] and keys["bf16"] != keys["fp32"]


def test_clip_weights_are_pinned_by_sha256_and_their_path_is_not_part_of_the_key(weights_file, shards, head,
                                                                                tmp_path):
    from pipeline.models.weights import sha256_of

    path, _ = weights_file
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    pinned = [prepare_run(_config(shards, tmp_path / "out", head, name=TEST_ARCH, pretrained=str(where),
                                  precision="fp32", device="cpu")).config for where in (path, copy)]
    assert [config.model.pretrained_sha256 for config in pinned] == [sha256_of(path)] * 2
    assert model_key(pinned[0]) == model_key(pinned[1])


def test_a_head_pin_added_leaves_the_key_as_it_was(shards, head, tmp_path):
    unpinned = HeadSpec(head.name, WeightsSpec(head.weights.uri))
    keys = [model_key(prepare_run(_config(shards, tmp_path / "out", spec, name="tiny-random", device="cpu")).config)
            for spec in (head, unpinned)]
    assert keys[0] == keys[1] and head.weights.sha256[:16] in keys[0]


def test_weights_of_another_architecture_are_refused_on_the_driver(weights_file, shards, head, tmp_path):
    path, _ = weights_file
    with pytest.raises(WeightsError, match="do not load into ViT-B-32"):
        prepare_run(_config(shards, tmp_path / "out", head, name="ViT-B-32", pretrained=str(path), device="cpu"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inputs, output, overlaps", [
    (["{root}/shards"], "{root}/shards/scores", True),
    (["{root}/shards"], "{root}", True),
    (["{root}/shards/*.tar"], "{root}/shards/scores", True),  # a glob's folder is the input's tree
    (["{root}/shards/00000.tar"], "{root}/shards-scores", False),
    (["{root}/shards"], "{root}/scores", False),
])
def test_output_and_input_may_not_overlap(tmp_path, inputs, output, overlaps):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    root = str(tmp_path)

    def check() -> None:
        check_output_location(output.format(root=root), [i.format(root=root) for i in inputs], {})

    if overlaps:
        with pytest.raises(OutputError, match="overlap"):
            check()
    else:
        check()
