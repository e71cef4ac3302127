"""Configuration: every key has a type and range check, and a bad value is one error naming its key."""

import dataclasses
import typing

import pytest

from metagan_dist.config import OptimConfig, TrainConfig, load_config


def every_key() -> dict[str, type]:
    """{'section.key': annotated type} for every option."""
    keys = {}
    for section in dataclasses.fields(TrainConfig):
        cls = type(section.default_factory())
        for name, hint in typing.get_type_hints(cls).items():
            keys[f"{section.name}.{name}"] = hint
    return keys


def test_every_key_has_a_check():
    unchecked = [f"{section.name}.{f.name}" for section in dataclasses.fields(TrainConfig)
                 for f in dataclasses.fields(section.default_factory()) if f.metadata.get("check") is None]
    assert unchecked == []  # every opt(...) names its check


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.beta1=1.5", "optim.beta1 must be in [0, 1), got 1.5"),
        ("optim.beta2=-0.1", "optim.beta2 must be in [0, 1), got -0.1"),
        ("run.max_skipped_steps=-5", "run.max_skipped_steps must be >= 0, got -5"),
        ("meta.gp_weight=-1", "meta.gp_weight must be >= 0, got -1.0"),
        ("model.width=-4", "model.width must be >= 0"),
        ("run.sample_steps=0", "run.sample_steps must be >= 1, got 0"),
        ("run.seed=-1", "run.seed must be >= 0, got -1"),
        ("run.select_tasks=-2", "run.select_tasks must be >= 0 (0 = off), got -2"),
        ("optim.weight_decay=-0.01", "optim.weight_decay must be >= 0"),
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("optim.name=lion", "unknown optim.name 'lion'; expected one of ('adam', 'sgd')"),
        ("optim.schedule=step", "unknown optim.schedule 'step'"),
        ("run.device=tpu", "unknown run.device 'tpu'"),
        ("data.pool=''", "data.pool must not be empty"),
        ("engine.bucket_mb=0", "engine.bucket_mb must be > 0"),
        ("meta=3", "config key 'meta' in the command line is a section, not a value (3)"),
        ("optim=[1]", "config key 'optim' in the command line is a section"),
        ("run.steps=many", "bad value for config key 'run.steps' in the command line"),
        ("data.skip_corrupt=maybe", "bad value for config key 'data.skip_corrupt'"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_key(override, message):
    with pytest.raises(ValueError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)
    assert "'?'" not in str(caught.value)


@pytest.mark.parametrize("key", sorted(every_key()))
def test_every_key_rejects_a_value_of_the_wrong_type(key):
    wrong = "[1, 2]" if every_key()[key] is str else "x"
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(None, [f"{key}={wrong}"])


@pytest.mark.parametrize("key", sorted(k for k, hint in every_key().items() if hint in (int, float)))
def test_every_number_key_built_in_code_rejects_a_string(key):
    section, name = key.split(".")
    with pytest.raises(ValueError, match=f"{key} must be of type"):
        dataclasses.replace(getattr(TrainConfig(), section), **{name: "x"})


def test_sections_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match=r"optim.beta1 must be in \[0, 1\), got 1.5"):
        OptimConfig(beta1=1.5)


def test_a_yaml_file_must_hold_sections(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"config file .*bad.yaml must hold sections \(model, data, meta"):
        load_config(path)
    path.write_text("run: 5\n")
    with pytest.raises(ValueError, match=r"config key 'run' in config file .*bad.yaml is a section"):
        load_config(path)
    path.write_text("run:\n# every key commented out\n")
    assert load_config(path) == TrainConfig()


def test_a_saved_config_without_newer_keys_means_what_it_meant_when_saved():
    from metagan_dist.config import from_dict, to_dict

    saved = to_dict(TrainConfig())
    newer = (("model", "support_dim"), ("model", "g_smooth"), ("model", "sample_median"), ("meta", "inner_rule"),
             ("meta", "d_steps"), ("meta", "g_average"))
    for section, key in newer:
        del saved[section][key]
    loaded = from_dict(saved, "old.pt")
    assert (loaded.model.support_dim, loaded.meta.inner_rule, loaded.meta.d_steps) == (0, "sgd", 1)
    assert loaded.model.g_smooth == 0  # a checkpoint from before the option never smoothed, whatever today's default
    assert loaded.model.sample_median == 0  # nor filtered its samples
    assert loaded.meta.g_average == 0 and TrainConfig().meta.g_average > 0  # nor averaged G's iterates
    assert from_dict(to_dict(TrainConfig()), "new.pt") == TrainConfig()
