"""Which units a run scores: new, changed, done, or stale under another model identity."""

from __future__ import annotations

from pipeline.config import HeadSpec, ModelConfig, ScoreConfig, WeightsSpec
from pipeline.io.shards import Shard
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
    plan_units = plan_run(config, shards, {})
    ids = [unit.unit_id for unit in plan_units.units]
    records = {ids[1]: _record(_shard(1, size=99), key), ids[2]: _record(shards[2], key),
                 ids[3]: _record(shards[3], other)}

    plan = plan_run(config, shards, records)
    assert plan.reasons == {ids[0]: "new", ids[1]: "shards added or changed"}
    assert plan.done == [ids[2]] and plan.stale == [ids[3]]

    rescoring = plan_run(config.replace(rescore=True), shards, records)
    assert rescoring.reasons[ids[3]].startswith(STALE) and rescoring.stale == []
