"""The config keys are documented where users look: ``train --help`` lists every key with its
default and comment, ``--print-config`` writes a complete YAML that reads back to the same config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from dreambooth_jax.train import train
from dreambooth_jax.training.config import TrainConfig, config_reference, load_config, to_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_key_has_a_section_and_a_comment():
    docs = config_reference()
    assert [d.key for d in docs] == [f.name for f in dataclasses.fields(TrainConfig)]
    missing = [d.key for d in docs if not d.comment or not d.section]
    assert not missing, f"config keys without a comment or section in TrainConfig: {missing}"
    assert {d.key: d.default for d in docs} == dataclasses.asdict(TrainConfig())


def test_help_lists_every_key_with_its_default():
    out = CliRunner().invoke(train, ["--help"]).output
    for d in config_reference():
        assert f"  {d.key} = " in out, d.key
    assert "lora_rank = 0  -- adapter rank" in out
    assert "--print-config" in out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_print_config_reads_back_equal(path, tmp_path):
    res = CliRunner().invoke(train, ["--config", str(path), "seed=7", "--print-config"])
    assert res.exit_code == 0, res.output
    printed = tmp_path / "full.yaml"
    printed.write_text(res.output)
    assert load_config(printed) == load_config(path, ["seed=7"])
    assert set(load_config(printed).__dict__) == {d.key for d in config_reference()}
    assert "seed: 7  # noise, timesteps, dropout and data order (default: 0)" in res.output


def test_print_config_of_defaults_and_bad_override():
    assert load_config(None) == TrainConfig()
    text = to_yaml(TrainConfig())
    assert "(default:" not in text  # nothing differs from the defaults
    res = CliRunner().invoke(train, ["lora_rnk=4", "--print-config"])
    assert res.exit_code != 0 and "unknown config key 'lora_rnk'" in res.output and "lora_rank" in res.output
    assert "Traceback" not in res.output
