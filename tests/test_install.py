"""gpg-vl installed from its wheel (not editable), used from a folder that is not the clone.

The wheel is built here and installed without its dependencies into a fresh virtual
environment, which reaches the test environment's packages (torch, transformers, ...)
through a path file: nothing is downloaded, and gpg_vl itself comes from the wheel only.
"""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sh(*args, cwd, timeout=300):
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh environment, a working folder outside the clone)."""
    tmp = tmp_path_factory.mktemp("install")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", ROOT,
       "-w", tmp / "wheel", cwd=tmp)
    (wheel,) = (tmp / "wheel").glob("gpg_vl-*.whl")
    sh(sys.executable, "-m", "venv", "--without-pip", tmp / "env", cwd=tmp)
    python = tmp / "env" / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).strip())
    # A plain path line: the test environment's packages, but not its editable gpg_vl (a .pth
    # file inside a directory named this way is not run).
    (site / "test_env_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel,
       cwd=tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return python, work


def test_the_wheel_holds_the_tasks_presets_models_and_samples(installed):
    python, work = installed
    where = sh(python, "-c", "import gpg_vl, gpg_vl.resources as r; print(gpg_vl.__file__);"
                             "print(r.preset_names()); print(r.tiny_model_names())", cwd=work).splitlines()
    assert str(python.parent.parent) in where[0] and str(ROOT) not in where[0]
    assert "shapes" in where[1] and "sat_tiny" in where[1]
    assert where[2] == "['qwen2', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl', 'qwen3_vl_moe']"
    names = sh(python.parent / "gpg-vl", "tasks", cwd=work).split()
    assert {"shapes", "lisa", "flower102", "geoqa", "sat", "cvbench", "math", "math_rs", "mini_count"} <= set(names)


def test_the_installed_package_trains_a_preset_from_another_folder(installed):
    python, work = installed
    sh(python.parent / "gpg-vl", "train", "--preset", "geoqa_tiny", "train.max_steps=2", "train.output_dir=run",
       "train.tensorboard=false", "task.eval_size=2", cwd=work)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (work / "run" / "checkpoints" / "step_000002" / "hf" / "config.json").is_file()
