"""What `gpg-vl tasks NAME` and `gpg-vl presets` print: a task's description, its options
(type, default, documentation), its metric and the bundled presets that train it."""

from __future__ import annotations

import inspect
import textwrap

from gpg_vl.resources import preset_names, preset_path
from gpg_vl.settings import describe_fields
from gpg_vl.task import Task, get_task_class


def preset_tasks() -> dict[str, tuple[str, str]]:
    """Each bundled preset's (training task, evaluated task), after what it extends."""
    from gpg_vl.config import read_yaml

    found = {}
    for name in preset_names():
        data = read_yaml(preset_path(name))
        task = (data.get("task") or {}).get("name", "shapes")
        found[name] = (task, (data.get("eval") or {}).get("task") or task)
    return found


def metric_line(cls: type[Task]) -> str:
    grouped = f", one column per row field {cls.metric_group!r} and their sample-weighted Total" \
        if cls.metric_group else ""
    return (f"{cls.metric_label}: the mean of the {cls.metric_component!r} reward over a split's items "
            f"(first completion){grouped}")


def task_help(name: str) -> str:
    """The description of the registered task (or plugin file) `name`."""
    cls = get_task_class(name)
    doc = textwrap.dedent(inspect.getdoc(cls) or "(no description)")
    weights = ", ".join(f"{c} (weight {cls.reward_weights.get(c, 1.0):g})" for c in cls.reward_components)
    lines = [f"{name}: {cls.__module__}.{cls.__name__}", "", doc, "", f"reward components: {weights}",
             f"metric: {metric_line(cls)}", "", "options (task.options.NAME=VALUE):"]
    fields = describe_fields(cls.Options)
    lines += [f"  {n} ({tp}, default {default!r})\n      {fdoc}" for n, tp, default, fdoc in fields] or ["  none"]
    presets = preset_tasks()
    trains = [p for p, (t, _) in presets.items() if t == name]
    evaluates = [p for p, (t, e) in presets.items() if e == name and t != name]
    lines += ["", f"presets: {', '.join(trains) or 'none'}"]
    if evaluates:
        lines.append(f"evaluated by presets that train another task: {', '.join(evaluates)}")
    return "\n".join(lines)


def presets_table() -> str:
    """One line per bundled preset: its name, training task and evaluated task."""
    rows = preset_tasks()
    width = max(map(len, rows))
    return "\n".join(f"{p:<{width}}  {t}" + (f" (evaluated on {e})" if e != t else "") for p, (t, e) in rows.items())
