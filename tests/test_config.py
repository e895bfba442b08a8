"""Config: YAML + dotted overrides, validation messages, field docs as help."""

import pytest

from gpg_vl.config import ConfigError, help_text, load_config, parse_override


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n  max_steps: 3\nalgorithm:\n  group_size: 4\n"
                    "task:\n  options:\n    kinds: [count]\n")
    cfg = load_config(path, ["train.max_steps=7", "task.options.image_size=84", "algorithm.beta_th=0.6"])
    assert cfg.train.learning_rate == 1e-4
    assert cfg.train.max_steps == 7
    assert cfg.algorithm.group_size == 4
    assert cfg.task.options == {"kinds": ["count"], "image_size": 84}
    assert cfg.algorithm.resolved("beta_th") == 0.6


def test_algorithm_defaults_resolve_per_algorithm():
    gpg = load_config(None, []).algorithm
    assert (gpg.resolved("advantage_norm"), gpg.resolved("alpha_correction"), gpg.resolved("beta_th")) == ("none", True, 0.4)
    grpo = load_config(None, ["algorithm.name=grpo"]).algorithm
    assert (grpo.resolved("advantage_norm"), grpo.resolved("alpha_correction"), grpo.resolved("beta_th")) == ("std", False, 0.0)
    dr = load_config(None, ["algorithm.name=dr_grpo"]).algorithm
    assert dr.resolved("loss_aggregation") == "constant"
    off = load_config(None, ["algorithm.alpha_correction=false", "algorithm.advantage_norm=std"]).algorithm
    assert off.resolved("alpha_correction") is False and off.resolved("advantage_norm") == "std"


@pytest.mark.parametrize("override,fragment", [
    ("train.learning_rat=1", "did you mean train.learning_rate"),
    ("trian.max_steps=1", "did you mean train"),
    ("algorithm.name=ppo", "gpg, grpo, dr_grpo"),
    ("algorithm.group_size=1", "at least 2"),
    ("algorithm.kl_coef=0.1", "gpg has no KL term"),
    ("algorithm.beta_th=1.5", "beta_th must be in [0, 1]"),
    ("train.max_steps=abc", "must be an integer"),
    ("train.lr_schedule=step", "linear, cosine or constant"),
    ("rollout.temperature=0", "temperature must be > 0"),
    ("task.eval_size=-1", "eval_size must be >= 0"),
    ("task.on_bad_row=ignore", "'error' or 'skip'"),
    ("task.max_image_pixels=0", "max_image_pixels must be >= 1"),
    ("task.reward_timeout_s=0", "reward_timeout_s must be > 0 seconds"),
    ("task.reward_workers=-1", "reward_workers must be >= 0"),
    ("max_steps=3", "section.option=value"),
])
def test_bad_values_say_how_to_fix(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_help_lists_every_option_with_its_doc():
    text = help_text()
    assert "algorithm.beta_th" in text and "resample while the fraction of valid groups" in text
    assert "task.eval_split" in text and "train.grad_accum" in text


def test_override_values_are_yaml():
    assert parse_override("train.adam_betas=[0.9, 0.95]") == ("train", "adam_betas", [0.9, 0.95])
    assert parse_override("model.path=") == ("model", "path", "")
    assert load_config(None, ["train.learning_rate=5e-4"]).train.learning_rate == 5e-4  # YAML 1.1: a string


def test_one_budget_at_a_time():
    with pytest.raises(ConfigError, match="set one budget"):
        load_config(None, ["train.max_steps=10", "train.max_samples=1000"])
    assert load_config(None, ["train.max_samples=1000"]).train.max_samples == 1000
