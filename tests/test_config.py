import pytest

from pipeline.config import (
    CREDENTIAL_OPTIONS,
    DEFAULT_HEAD,
    KNOWN_HEADS,
    ConfigError,
    ModelConfig,
    ResourcesConfig,
    ScoreConfig,
    WeightsSpec,
    config_from_mapping,
)


def test_defaults_are_the_laion_v2_setup():
    config = ScoreConfig(input=("in",), output="out")
    assert config.model.name == "ViT-L-14-quickgelu" and config.model.pretrained == "openai"
    assert config.primary_head.name == DEFAULT_HEAD
    assert config.primary_head.weights.sha256 == "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


@pytest.mark.parametrize("build, message", [
    (lambda: ModelConfig(precision="fp8"), "precision"),
    (lambda: ModelConfig(device="tpu"), "device"),
    (lambda: ResourcesConfig(min_actors=3, max_actors=2), "min_actors"),
    (lambda: ResourcesConfig(decode_cpus=2, decode_cpus_per_actor=1), "decode_cpus_per_actor"),
    (lambda: ResourcesConfig(cpu_threads_per_actor=0), "cpu_threads_per_actor"),
    (lambda: WeightsSpec("x.pth", "abc"), "64 lowercase hex"),
    (lambda: ScoreConfig(input=(), output="o"), "input"),
    (lambda: ScoreConfig(input=("i",), output="o", shards_per_unit=0), "shards_per_unit"),
    (lambda: ScoreConfig(input=("i",), output="o", storage_options={"secret": "x"}), "credentials"),
])
def test_bad_values_are_rejected_with_the_field_named(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize("name", sorted(CREDENTIAL_OPTIONS))
def test_every_credential_option_is_refused_in_any_case(name):
    for spelling in (name, name.upper()):
        with pytest.raises(ConfigError, match="credentials"):
            ScoreConfig(input=("i",), output="o", storage_options={spelling: "x"})
    ScoreConfig(input=("i",), output="o", storage_options={"endpoint_url": "http://127.0.0.1:9000"})


def test_a_mapping_builds_nested_config_and_rejects_unknown_keys():
    config = config_from_mapping({
        "input": "s3://b/shards/", "output": "s3://b/out/",
        "model": {"name": "tiny-random", "precision": "fp32"},
        "heads": ["sa_0_4_vit_l_14_linear", {"uri": "/w/my-head.pth", "sha256": "0" * 64}],
        "resources": {"max_actors": 4},
        "listing": {"mode": "full", "full_every_days": 3},
    })
    assert config.input == ("s3://b/shards/",)
    assert (config.listing.mode, config.listing.full_every_days) == ("full", 3)
    assert [h.name for h in config.heads] == ["sa_0_4_vit_l_14_linear", "my-head"]
    assert config.heads[0] == KNOWN_HEADS["sa_0_4_vit_l_14_linear"]
    with pytest.raises(ConfigError, match="unknown model setting"):
        config_from_mapping({"input": "i", "output": "o", "model": {"nmae": "x"}})
    with pytest.raises(ConfigError, match="unknown listing setting"):
        config_from_mapping({"input": "i", "output": "o", "listing": {"often": 1}})


def test_decode_cpus_per_actor_sets_how_many_decode_tasks_feed_the_actor_pool():
    assert ResourcesConfig().decode_task_limit is None  # Ray fills the free CPUs
    assert ResourcesConfig(max_actors=4, decode_cpus_per_actor=6).decode_task_limit == 24
    assert ResourcesConfig(max_actors=4, decode_cpus=2, decode_cpus_per_actor=6).decode_task_limit == 12
    explicit = ResourcesConfig(max_actors=4, decode_cpus_per_actor=6, decode_concurrency=3)
    assert explicit.decode_task_limit == 3
