"""The task registry: built-ins, plugin files, entry points, "did you mean"."""

import sys
import textwrap

import pytest

from gpg_vl import task as registry

PLUGIN = textwrap.dedent('''
    from gpg_vl.task import Task, register_task

    @register_task("{name}")
    class Echo(Task):
        reward_components = ("accuracy",)

        def rows(self, split):
            return [{{"q": "say hi", "a": "hi"}}]

        def prompt(self, row):
            return row["q"]

        def score(self, completion, row, ctx):
            return {{"accuracy": float(completion.strip() == row["a"])}}
''')


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_builtins_loaded", False)


def test_builtin_shapes_is_listed(fresh_registry):
    assert "shapes" in registry.task_names()


def test_unknown_name_suggests_and_lists(fresh_registry):
    with pytest.raises(registry.UnknownTaskError) as err:
        registry.get_task_class("shape")
    msg = str(err.value)
    assert "Did you mean 'shapes'" in msg and "Registered tasks:" in msg


def test_plugin_file_by_path(tmp_path, fresh_registry):
    path = tmp_path / "echo_task.py"
    path.write_text(PLUGIN.format(name="echo_file"))
    cls = registry.get_task_class(str(path))
    task = cls(registry.TaskConfig(name=str(path)))
    assert task.rows("train")[0]["a"] == "hi"
    assert registry.get_task_class(f"{path}:Echo") is cls
    assert "echo_file" in registry.task_names()


def test_missing_plugin_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        registry.get_task_class(str(tmp_path / "nope.py"))


def test_entry_point_group(tmp_path, monkeypatch, fresh_registry):
    (tmp_path / "ep_echo.py").write_text(PLUGIN.format(name="echo_ep_internal"))
    dist = tmp_path / "ep_echo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-echo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gpg_vl.tasks]\necho_ep = ep_echo:Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "echo_ep_internal" in registry.task_names()
    sys.modules.pop("ep_echo", None)


def test_a_raising_reward_scores_zero_and_is_counted(tmp_path, fresh_registry):
    path = tmp_path / "boom_task.py"
    path.write_text(PLUGIN.format(name="boom").replace('float(completion.strip() == row["a"])', "1 / 0"))
    task = registry.get_task_class(str(path))(registry.TaskConfig())
    comps, ok = task.safe_score("hi", {"a": "hi"}, None)
    assert comps == {"accuracy": 0.0} and ok is False
    task.score = lambda *a: {"accuracy": float("nan")}
    assert task.safe_score("hi", {"a": "hi"}, None) == ({"accuracy": 0.0}, False)


def test_a_broken_plugin_is_reported_not_fatal(tmp_path, monkeypatch, fresh_registry):
    package = tmp_path / "some_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import not_a_module_anywhere\n")
    (package / "fine.py").write_text(PLUGIN.format(name="fine"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "BUILTIN_PACKAGE", "some_tasks")
    monkeypatch.setattr(registry, "_REGISTRY", {})
    assert registry.task_names() == ["fine"]
    with pytest.raises(registry.UnknownTaskError, match="some_tasks.broken: ModuleNotFoundError"):
        registry.get_task_class("nothing")
    for name in ("some_tasks", "some_tasks.broken", "some_tasks.fine"):
        sys.modules.pop(name, None)
