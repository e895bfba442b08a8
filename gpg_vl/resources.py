"""Files that ship inside the package: the presets, the tiny models, the task samples.

They are found next to this file, so an installed gpg-vl (`pip install .`, not only a clone)
trains and evaluates from any working directory. A bundled tiny model is named
`tiny:<family>` wherever a model path is expected (`model.path: tiny:qwen2_vl`); a task's
bundled sample is what it reads when `task.data_path` is empty.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ASSETS = PACKAGE / "assets"
SAMPLES = ASSETS / "samples"
TINY_MODELS = ASSETS / "tiny"
PRESETS = PACKAGE / "presets"
TINY_PREFIX = "tiny:"


def tiny_model_names() -> list[str]:
    return sorted(p.name for p in TINY_MODELS.iterdir() if (p / "config.json").is_file())


def model_location(path: str) -> str:
    """A model path as a loader takes it: `tiny:<family>` becomes the bundled folder, anything
    else (a local folder, a hub name) is returned as it is."""
    if not path.startswith(TINY_PREFIX):
        return path
    name = path[len(TINY_PREFIX):]
    if name not in tiny_model_names():
        raise FileNotFoundError(f"no bundled tiny model {name!r}; the bundled ones are "
                                f"{', '.join(TINY_PREFIX + n for n in tiny_model_names())}")
    return str(TINY_MODELS / name)


def sample_path(name: str) -> str:
    """The bundled sample folder of a task (its real on-disk format, generated images)."""
    return str(SAMPLES / name)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of a bundled preset; an unknown name says which ones exist."""
    import difflib

    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise FileNotFoundError(f"no preset {name!r}.{hint} Presets: {', '.join(preset_names())}")
    return path
