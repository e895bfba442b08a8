"""The command line and the launch script, each run in a subprocess with tiny settings."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def run(*args, timeout=300):
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_tasks_lists_one_name_a_line():
    done = run(sys.executable, "-m", "gpg_vl.cli", "tasks")
    assert done.returncode == 0 and "shapes" in done.stdout.splitlines()


def test_train_help_documents_every_option():
    done = run(sys.executable, "-m", "gpg_vl.cli", "train", "--help")
    assert done.returncode == 0
    assert "algorithm.beta_th" in done.stdout and "beta_th: resample while" in done.stdout


def test_a_bad_option_is_a_clear_error():
    done = run(sys.executable, "-m", "gpg_vl.cli", "train", "train.learning_rat=1")
    assert done.returncode == 2 and "did you mean train.learning_rate" in done.stderr
    done = run(sys.executable, "-m", "gpg_vl.cli", "train", "task.name=shape")
    assert done.returncode == 2 and "Did you mean 'shapes'" in done.stderr


def test_run_task_script_trains_the_tiny_preset(tmp_path):
    done = run("bash", "scripts/run_task.sh", "shapes", f"train.output_dir={tmp_path}", "train.max_steps=1",
               "task.eval_size=8", "train.tensorboard=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "curves.png").exists()


def test_run_task_script_names_the_presets_it_has():
    done = run("bash", "scripts/run_task.sh", "shapes", "--preset", "huge")
    assert done.returncode == 2 and "no preset shapes_huge" in done.stderr and "  shapes\n" in done.stderr


def test_the_example_plugin_outside_tasks_trains(tmp_path):
    done = run(sys.executable, "-m", "gpg_vl.cli", "train", "--preset", "shapes",
               f"task.name={ROOT / 'assets/examples/brightness_task.py'}", "task.options={num_rows: 64}",
               f"train.output_dir={tmp_path}", "train.max_steps=2", "task.eval_size=8", "train.tensorboard=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"reward/accuracy"' in (tmp_path / "metrics.jsonl").read_text()
