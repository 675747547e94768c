"""Which units a run scores: new, changed, done, or stale under another model identity."""

from __future__ import annotations

from pipeline.config import HeadSpec, ModelConfig, ScoreConfig, WeightsSpec
from pipeline.io.shards import Shard
from pipeline.io.units import Committed
from pipeline.planning import STALE, model_key, plan_run

HEAD = HeadSpec("h", WeightsSpec("/w/h.pth", "a" * 64))


def _config(**changes) -> ScoreConfig:
    values = dict(input=("/in",), output="/out", shards_per_unit=1, heads=(HEAD,),
                  model=ModelConfig(name="ViT-B-32", pretrained="/w/b32.safetensors", pretrained_sha256="b" * 64,
                                    precision="fp16", device="cuda"))
    values.update(changes)
    return ScoreConfig(**values)


def _shard(number: int, size: int = 100) -> Shard:
    name = f"/in/{number:05d}.tar"
    return Shard(name=name, tar=name, sidecar=None, size=size, etag="t")


def _record(shard: Shard, key: str) -> dict:
    return {"shards": [shard.version()], "model_key": key, "shards_per_unit": 1}


def test_the_key_names_weights_by_digest_and_the_precision_that_ran():
    assert model_key(_config()) == f"ViT-B-32@{'b' * 16}/fp16|h@{'a' * 16}"
    moved = _config(model=ModelConfig(name="ViT-B-32", pretrained="s3://elsewhere/x.safetensors",
                                      pretrained_sha256="b" * 64, precision="fp16", device="cuda"))
    assert model_key(moved) == model_key(_config())


def test_units_are_new_changed_done_or_stale():
    config = _config()
    shards = [_shard(0), _shard(1), _shard(2), _shard(3)]
    key = model_key(config)
    other = model_key(_config(model=ModelConfig(name="ViT-B-32", pretrained="/w/b32.safetensors",
                                                pretrained_sha256="b" * 64, precision="bf16", device="cuda")))
    ids = plan_run(config, shards, Committed.of_records({})).unit_ids
    records = {ids[1]: _record(_shard(1, size=99), key), ids[2]: _record(shards[2], key),
                 ids[3]: _record(shards[3], other)}

    plan = plan_run(config, shards, Committed.of_records(records))
    assert plan.reasons == {ids[0]: "new", ids[1]: "shards added or changed"}
    assert plan.done == [ids[2]] and plan.stale == [ids[3]]

    rescoring = plan_run(config.replace(rescore=True), shards, Committed.of_records(records))
    assert rescoring.reasons[ids[3]].startswith(STALE) and rescoring.stale == []


def test_a_unit_is_done_only_with_exactly_its_items_at_their_versions_a_missing_etag_equal_to_a_missing_one():
    config = _config(shards_per_unit=2)
    key = model_key(config)
    sidecar_only = Shard(name="/in/00001.parquet", tar=None, sidecar="/in/00001.parquet", size=0, etag=None)
    shards = [_shard(0), sidecar_only, _shard(2), _shard(3), _shard(4)]
    ids = plan_run(config, shards, Committed.of_records({})).unit_ids
    records = {ids[0]: {"shards": [sidecar_only.version(), shards[0].version()], "model_key": key},  # any order
               ids[1]: {"shards": [shards[2].version()], "model_key": key},  # a shard arrived since
               ids[2]: {"shards": [shards[4].version(), _shard(5).version()], "model_key": key}}  # one went
    plan = plan_run(config, shards, Committed.of_records(records))
    assert plan.done == [ids[0]]
    assert plan.reasons == {ids[1]: "shards added or changed", ids[2]: "shards added or changed"}
    assert [[s.name for s in unit.shards] for unit in plan.pending] == [["/in/00002.tar", "/in/00003.tar"],
                                                                         ["/in/00004.tar"]]
