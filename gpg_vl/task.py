"""The task plugin contract and the registry of task names.

A task is one small class: it supplies rows, the prompt of a row, the images of a row, and
a reward made of named components. It knows nothing of the trainer. Three ways in:

- a file in the repository's `tasks/` folder that decorates its class with
  `@register_task("name")` (the built-in tasks);
- an installed package that declares an entry point in the group `gpg_vl.tasks`
  (``[project.entry-points."gpg_vl.tasks"] mytask = "mypkg.mytask:MyTask"``);
- a path to a Python file, given where a task name is expected
  (``task.name=path/to/my_task.py`` or ``path/to/my_task.py:MyTask``).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import importlib.util
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Sequence, Union

from PIL import Image

from gpg_vl.boxes import BoxConvention
from gpg_vl.rewards import REWARD_TIMEOUT_S

Row = dict[str, Any]
# A chat: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}].
# A plain string is a raw prompt sent without a chat template (base models).
Prompt = Union[list[dict[str, Any]], str]

ENTRY_POINT_GROUP = "gpg_vl.tasks"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default limit (Image.MAX_IMAGE_PIXELS)
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "tasks"


def held_out(key: str, share: int) -> bool:
    """Whether a generated item (named by a string of its content) is in the held-out split:
    one in `share`, decided by a stable hash, so that a scene seen in training never recurs
    in the test split."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return digest % share == 0


def image_chat(text: str) -> list[dict[str, Any]]:
    """The usual vision prompt: one user turn holding the image, then the text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


class UnknownTaskError(LookupError):
    """A task name that is neither registered nor a plugin file."""


@dataclass(frozen=True)
class ScoreContext:
    """What a reward may know about the model that wrote the completion."""

    boxes: BoxConvention


@dataclass
class TaskConfig:
    name: str = "shapes"
    """Registered task name, or a path to a plugin file (`file.py` or `file.py:ClassName`)."""
    data_path: str = ""
    """Local data file or folder, or a hub data set name; empty = the task's bundled sample."""
    image_root: str = ""
    """Folder that image paths in the data are relative to; empty = the data file's folder."""
    on_bad_row: str = "error"
    """An unusable row: 'error' stops naming the file and row; 'skip' drops it and reports the count."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width x height, before resizing) a row may have; a larger one is a bad row (a guard against decompression bombs)."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str = "test"
    """Split used for held-out greedy evaluation during training; empty = no evaluation."""
    eval_size: int = 64
    """Rows of the evaluation split scored at each evaluation (0 = all)."""
    reward_timeout_s: float = REWARD_TIMEOUT_S
    """Seconds one completion's reward may take (a symbolic check, say); one that runs longer scores 0 and is counted in reward_failures."""
    reward_workers: int = 2
    """Processes that score a batch's completions side by side, each stopped at reward_timeout_s; 0 = score in the trainer's process (then only symbolic checks are time-limited)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific settings, documented in the task's class docstring."""


class Task(ABC):
    """Base class of all task plugins. Subclasses set `reward_components` and implement
    the four hooks. `score` returns one float per component; the training reward is
    their weighted sum (weights default to 1). The component named "accuracy" is the
    task's headline metric."""

    name: ClassVar[str] = ""
    reward_components: ClassVar[tuple[str, ...]] = ("accuracy",)
    reward_weights: ClassVar[dict[str, float]] = {}
    # How `gpg-vl eval` reports the task (gpg_vl/evaluate.py): the mean of one component over a
    # split, in percent, under the paper's name, optionally one column per value of a row field.
    metric_component: ClassVar[str] = "accuracy"
    metric_label: ClassVar[str] = "accuracy"
    metric_group: ClassVar[str] = ""

    def __init__(self, config: TaskConfig):
        self.config = config
        self.load_reports: dict[str, Any] = {}
        """split -> the gpg_vl.datafiles.LoadReport of each split read from files."""

    def skipped_rows(self, split: str) -> int:
        """Bad rows dropped (task.on_bad_row=skip) when `split` was read; 0 for a split not read
        yet or not read from files."""
        report = self.load_reports.get(split)
        return report.skipped if report is not None else 0

    @abstractmethod
    def rows(self, split: str) -> Sequence[Row]:
        """All usable rows of a split, in a fixed order."""

    @abstractmethod
    def prompt(self, row: Row) -> Prompt:
        """The prompt: chat messages with one {"type": "image"} per image, or a raw string."""

    def images(self, row: Row) -> list[Image.Image]:
        """The row's images, in the order of the image placeholders (none for text tasks)."""
        return []

    def image_sizes(self, row: Row) -> list[tuple[int, int]]:
        """(width, height) of each image of the row, for counting prompt tokens before any
        image is processed. This default decodes the images; a task whose images are files
        can read the sizes from their headers."""
        return [image.size for image in self.images(row)]

    @abstractmethod
    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        """One value per name in `reward_components`. May raise: the trainer then scores
        the completion 0 on every component and counts the failure."""

    def answer(self, completion: str, row: Row, ctx: ScoreContext) -> Any:
        """What `score` reads as the completion's answer (JSON-serialisable), recorded by the
        evaluation; None when nothing parses, and by default (a task need not say)."""
        return None

    def gold_mask(self, row: Row) -> Any:
        """The row's gold segmentation mask for gIoU/cIoU, a uint8 array [H, W] (1 = object,
        0 = background, 255 = ignored), or None when the data has none (the default)."""
        return None

    def options_with_defaults(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """`config.options` over `defaults`; an unknown option name stops with "did you mean"."""
        for name in self.config.options:
            if name not in defaults:
                close = difflib.get_close_matches(name, defaults, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{self.name}: unknown option {name!r}.{hint} "
                                 f"Known options: {', '.join(defaults) or 'none'}")
        return {**defaults, **self.config.options}

    def weight(self, component: str) -> float:
        return self.reward_weights.get(component, 1.0)

    def total_reward(self, components: dict[str, float]) -> float:
        return sum(self.weight(k) * components[k] for k in self.reward_components)

    def safe_score(self, completion: str, row: Row, ctx: ScoreContext) -> tuple[dict[str, float], bool]:
        """`score` that never raises: (components, ok). A failure (an exception or a value
        that is not finite) scores 0 everywhere."""
        try:
            got = self.score(completion, row, ctx)
            values = {k: float(got[k]) for k in self.reward_components}
            if all(math.isfinite(v) for v in values.values()):  # NaN would poison the advantages
                return values, True
        except Exception:  # a reward must never stop training: counted by the caller
            pass
        return {k: 0.0 for k in self.reward_components}, False


_REGISTRY: dict[str, type[Task]] = {}
_FILE_TASKS: dict[Path, list[tuple[str, type[Task]]]] = {}  # what each imported plugin file registered
_LOAD_ERRORS: list[str] = []
_builtins_loaded = False


def register_task(name: str):
    """Class decorator: make a Task subclass available under `name`."""

    def wrap(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register_task({name!r}) must decorate a gpg_vl.task.Task subclass")
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"task name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _import_file(path: Path):
    """Import a plugin file once; importing it again re-registers what it registered."""
    path = path.resolve()
    if path in _FILE_TASKS:
        for name, cls in _FILE_TASKS[path]:
            _REGISTRY.setdefault(name, cls)
        return sys.modules[_module_name(path)]
    spec = importlib.util.spec_from_file_location(_module_name(path), path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import task plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    before = dict(_REGISTRY)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    _FILE_TASKS[path] = [(n, c) for n, c in _REGISTRY.items() if before.get(n) is not c]
    return module


def _module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]  # two files may share a stem
    return f"gpg_vl_plugin_{path.stem}_{digest}"


def _load_builtins() -> None:
    """Import tasks/*.py and the entry points; a plugin that fails is reported, not fatal."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _LOAD_ERRORS.clear()
    for path in sorted(BUILTIN_DIR.glob("*.py")):
        if not path.name.startswith("_"):
            try:
                _import_file(path)
            except Exception as err:
                _LOAD_ERRORS.append(f"{path}: {type(err).__name__}: {err}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:
            _LOAD_ERRORS.append(f"entry point {ep.name} = {ep.value}: {type(err).__name__}: {err}")
            continue
        if isinstance(obj, type) and issubclass(obj, Task) and ep.name not in _REGISTRY:
            register_task(ep.name)(obj)
    _builtins_loaded = True


def task_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _from_file(spec: str) -> type[Task]:
    file, _, cls_name = spec.partition(":")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"task plugin file not found: {path}")
    module = _import_file(path)
    if cls_name:
        return getattr(module, cls_name)
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Task) and v is not Task
             and v.__module__ == module.__name__]
    if len(found) != 1:
        raise ValueError(f"{path} defines {len(found)} Task classes; name one: {path}:ClassName")
    return found[0]


def get_task_class(name: str) -> type[Task]:
    """The class registered under `name`, or loaded from a plugin file path."""
    if name.endswith(".py") or ".py:" in name:
        return _from_file(name)
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    broken = "".join(f"\n  plugin that failed to load: {e}" for e in _LOAD_ERRORS)
    raise UnknownTaskError(f"unknown task {name!r}.{hint} Registered tasks: {', '.join(sorted(_REGISTRY))}. "
                           f"A plugin file can be given as a path: task.name=path/to/task.py{broken}")


def build_task(config: TaskConfig) -> Task:
    return get_task_class(config.name)(config)
