"""Trackers through accelerate (train.report_to), offline, and the table of sample completions:
what the trackers and samples.jsonl receive, resume, and the clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gpg_vl.config import ConfigError, load_config
from gpg_vl.resources import PRESETS
from gpg_vl.trackers import flat_config, require_installed
from gpg_vl.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def config(out: Path, *overrides: str):
    return load_config(PRESETS / "shapes.yaml",
                       [f"train.output_dir={out}", "train.max_steps=2", "task.eval_size=4", "train.eval_every=0",
                        "train.save_every=0", "train.plot=false", "train.prompts_per_device=2", *overrides])


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))  # the run's scalars (the hyperparameters are in a subfolder)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_tensorboard_and_wandb_offline_get_the_metrics_and_the_samples_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # never a network call
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(config(out, "train.tensorboard=false", "train.report_to=[tensorboard, wandb]", "train.log_samples_every=1",
                 "train.log_samples=2", "train.run_name=offline-test"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    logged = scalars(out / "gpg-vl")  # accelerate's TensorBoard tracker: output_dir/<project>
    assert [s for s, _ in logged["loss"]] == [1, 2]
    assert [round(v, 5) for _, v in logged["loss"]] == [round(r["loss"], 5) for r in steps]
    assert "eval/accuracy" in logged
    (run,) = (out / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb")) and (run / "files").is_dir()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    group = 8  # the preset's G: two groups a step, every completion of each
    assert [r["step"] for r in samples] == [1] * 2 * group + [2] * 2 * group
    for r in samples:
        assert set(r) == {"step", "prompt", "completion", "reward", "accuracy", "format"}
        assert r["prompt"].startswith("<|im_start|>user") and r["reward"] == pytest.approx(r["accuracy"] +
                                                                                          0.5 * r["format"])


def test_samples_are_cut_back_to_the_checkpoint_on_resume(tmp_path):
    out = tmp_path / "run"
    train(config(out, "train.tensorboard=false", "train.log_samples_every=1", "train.log_samples=1"))
    with (out / "samples.jsonl").open("a") as f:  # rows of a step after the last checkpoint, then a crash
        f.write(json.dumps({"step": 3, "prompt": "p", "completion": "c", "reward": 0.0}) + "\n")
    train(config(out, "train.tensorboard=false", "train.log_samples_every=1", "train.log_samples=1",
                 "train.max_steps=3", "train.resume=latest"))
    steps = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert steps == [1] * 8 + [2] * 8 + [3] * 8


@pytest.mark.parametrize("overrides, message", [
    (["train.report_to=[wandbb]"], "unknown tracker 'wandbb'"),
    (["train.report_to=[tensorboard]"], "written twice"),
    (["train.log_samples=0"], "log_samples >= 1"),
])
def test_bad_tracker_settings_say_how_to_fix_them(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_missing_tracker_package_is_named_before_training(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="train.report_to names swanlab, not installed here: pip install swanlab"):
        require_installed(["tensorboard", "swanlab"])


def test_the_config_reaches_the_trackers_flat():
    assert flat_config({"model": {"lora": {"rank": 4, "target_modules": ["q_proj"]}}, "train": {"seed": 1}}) == {
        "model.lora.rank": 4, "model.lora.target_modules": "['q_proj']", "train.seed": 1}
