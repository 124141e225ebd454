import pytest

from illada.config import ConfigError, dump_config, load_config
from tests.conftest import REPO
from tests.helpers import make_config

SOURCES = [{"name": "a", "paths": ["/data/a.jsonl"], "weight": 3}, {"name": "b", "paths": ["/data/b.jsonl"], "weight": 1}]


def test_overrides_set_nested_values_and_list_items(tmp_path):
    config = make_config(tmp_path, SOURCES, ["data.pack.seq_len=1024", "data.sources.1.weight=3", "data.dedup.fuzzy.enabled=true"])
    assert config.data.pack.seq_len == 1024
    assert config.data.sources[1].weight == 3
    assert config.data.dedup.fuzzy.enabled is True
    assert config.data.mix() == {"a": 0.5, "b": 0.5}


def test_unknown_override_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.pack\.seqlen.*did you mean 'seq_len'"):
        make_config(tmp_path, SOURCES, ["data.pack.seqlen=10"])


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.pack\.seq_len: .*greater than 1 .*got -5"):
        make_config(tmp_path, SOURCES, ["data.pack.seq_len=-5"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nroot: /tmp/x\ndata:\n  sources: []\n  pakc: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.pakc: unknown key" in str(err.value)
    assert "data.sources: List should have at least 1 item" in str(err.value)


def test_duplicate_source_names_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="repeated: a"):
        make_config(tmp_path, [SOURCES[0], SOURCES[0]])


def test_unset_environment_variable_in_a_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ILLADA_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="ILLADA_TEST_UNSET"):
        make_config(tmp_path, [{"name": "a", "paths": ["${ILLADA_TEST_UNSET}/x.jsonl"], "weight": 1}])
    monkeypatch.setenv("ILLADA_TEST_UNSET", "/data")
    assert make_config(tmp_path, [{"name": "a", "paths": ["${ILLADA_TEST_UNSET}/x.jsonl"], "weight": 1}]).data.sources[0].paths == ["/data/x.jsonl"]


def test_secrets_never_appear_in_the_dumped_config(tmp_path):
    config = make_config(tmp_path, SOURCES, ["storage.s3.key=AKIAEXAMPLEKEY", "storage.s3.secret=supersecretvalue"])
    assert config.storage.s3.secret.get_secret_value() == "supersecretvalue"
    dumped = dump_config(config)
    assert "supersecretvalue" not in dumped and "AKIAEXAMPLEKEY" not in dumped


def test_dumped_config_loads_back_to_the_same_config(tmp_path):
    config = make_config(tmp_path, SOURCES, ["data.pack.seq_len=77"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "model"))
def test_every_shipped_config_is_valid_and_its_parallel_layout_fits_its_model(path):
    from illada.model.config import check_parallel_sizes

    config = load_config(REPO / path)
    if config.train is not None:
        check_parallel_sizes(config.model, config.train.parallel.tensor, config.train.parallel.pipeline)
        assert config.train.global_batch_size % config.train.micro_batch_size == 0
