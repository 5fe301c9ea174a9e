from __future__ import annotations

import pytest

from stso_env.config import (
    CONFIG_DIR,
    TrainConfig,
    apply_overrides,
    config_hash,
    describe,
    load_config,
    to_dict,
)
from stso_env.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_and_nested_values(tmp_path):
    cfg = load_config(TrainConfig, write(tmp_path, "seed: 3\noptim:\n  lr: 1e-3\ndata:\n  batch_size: 4\n"))
    assert cfg.seed == 3 and cfg.optim.lr == 1e-3 and cfg.data.batch_size == 4
    assert cfg.model.preset == "tiny" and cfg.checkpoint.every == 1000 and cfg.checkpoint.keep == 2


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    p = write(tmp_path, "optim:\n  lr_warmup: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    msg = str(e.value)
    assert str(p) in msg and "optim.lr_warmup" in msg and "unknown key" in msg and "warmup_steps" in msg


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected an integer, got str 'eight'"):
        load_config(TrainConfig, write(tmp_path, "data:\n  batch_size: eight\n"))
    with pytest.raises(ConfigError, match=r"checkpoint\.async_write: expected true or false"):
        load_config(TrainConfig, write(tmp_path, "checkpoint:\n  async_write: 1\n"))


def test_out_of_range_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint\.keep: 1 is out of range; allowed 2 <= value"):
        load_config(TrainConfig, write(tmp_path, "checkpoint:\n  keep: 1\n"))
    with pytest.raises(ConfigError, match=r"model\.preset: 'huge' is not allowed; choose one of tiny"):
        load_config(TrainConfig, write(tmp_path, "model:\n  preset: huge\n"))


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="micro_batches"):
        load_config(TrainConfig, write(tmp_path, "data:\n  batch_size: 8\noptim:\n  micro_batches: 3\n"))
    with pytest.raises(ConfigError, match="arc_f"):
        load_config(TrainConfig, write(tmp_path, "clip:\n  arc_shards: 4\n  arc_f: 2\n"))


def test_malformed_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, write(tmp_path, "seed: [1,\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainConfig, write(tmp_path, "- 1\n- 2\n"))


def test_overrides_validated_and_hash_changes():
    cfg = TrainConfig()
    cfg2 = apply_overrides(cfg, {"optim.lr": 0.01, "seed": 5})
    assert cfg2.optim.lr == 0.01 and cfg2.seed == 5 and cfg.seed == 0
    assert config_hash(cfg) != config_hash(cfg2)
    assert config_hash(cfg) == config_hash(TrainConfig())
    with pytest.raises(ConfigError, match="<override>: optim.lr: -1"):
        apply_overrides(cfg, {"optim.lr": -1})


def test_round_trip_and_describe():
    cfg = TrainConfig()
    assert to_dict(cfg)["optim"]["beta2"] == 0.95
    rows = {k: h for k, _, h in describe(TrainConfig)}
    assert "optim.lr" in rows and "peak learning rate" in rows["optim.lr"]


def test_shipped_configs_load():
    files = sorted((CONFIG_DIR / "train").glob("*.yaml"))
    assert files, "configs/train/ should ship presets"
    for f in files:
        load_config(TrainConfig, f)
