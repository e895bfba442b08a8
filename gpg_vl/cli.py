"""The `gpg-vl` command: train, eval, eval-merge, tasks, plot, bench, build-tiny. No logic of its own."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from gpg_vl.config import load_config, to_yaml
    from gpg_vl.trainer import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=latest")
    cfg = load_config(_config_file(args), overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    train(cfg)
    _say_where_outputs_are(cfg.train.output_dir)
    return 0


def _say_where_outputs_are(output_dir: str) -> None:
    from accelerate import PartialState

    from gpg_vl.checkpoint import list_checkpoints
    from gpg_vl.metrics import METRICS_FILE, PLOT_FILE

    if PartialState().is_main_process:
        found = list_checkpoints(output_dir)
        last = f"; the final model in {found[-1] / 'hf'} (gpg-vl eval --config {output_dir}/config.yaml)" if found else ""
        print(f"outputs in {output_dir}: config.yaml, {METRICS_FILE}, {PLOT_FILE}, checkpoints/{last}")


def _config_file(args: argparse.Namespace):
    """--config FILE or --preset NAME (a bundled preset), not both."""
    from gpg_vl.config import ConfigError
    from gpg_vl.resources import preset_path

    if args.config and args.preset:
        raise ConfigError("give --config FILE or --preset NAME, not both")
    return preset_path(args.preset) if args.preset else args.config


# gpg-vl eval's flags: each sets one config option, and its help is that option's documentation.
EVAL_FLAGS = {
    "--task": "eval.task", "--model": "eval.model", "--output": "eval.output_dir", "--name": "eval.name",
    "--data-path": "eval.data_path", "--split": "eval.splits", "--image-root": "eval.image_root",
    "--samples": "eval.samples", "--temperature": "eval.temperature", "--top-p": "eval.top_p",
    "--top-k": "eval.top_k", "--max-new-tokens": "eval.max_new_tokens", "--batch-size": "eval.batch_size",
    "--limit": "eval.limit", "--seed": "eval.seed", "--pred-masks": "eval.pred_masks",
    "--on-bad-row": "task.on_bad_row", "--max-image-pixels": "task.max_image_pixels",
    "--reward-timeout-s": "task.reward_timeout_s", "--reward-workers": "task.reward_workers",
    "--dtype": "model.dtype", "--max-pixels": "model.max_pixels", "--min-pixels": "model.min_pixels",
}
# Repeated NAME=VALUE flags, each one key of a mapping option.
EVAL_PAIRS = {"--data": ("eval.benchmarks", "NAME=PATH"), "--option": ("eval.options", "KEY=VALUE")}
ANOTHER_TASK = {"eval.data_path": "", "eval.data_config": "", "eval.data_revision": "", "eval.image_root": "",
                "eval.options": {}}
"""What --task resets when it names another task than the config evaluates: its data and options."""


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _eval_values(args: argparse.Namespace) -> dict:
    """The dotted config keys the flags given set."""
    import yaml

    from gpg_vl.config import ConfigError

    values = {key: getattr(args, _dest(flag)) for flag, key in EVAL_FLAGS.items()
              if getattr(args, _dest(flag)) is not None}
    for flag, (key, _) in EVAL_PAIRS.items():
        for item in getattr(args, _dest(flag)):
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ConfigError(f"{flag} takes {EVAL_PAIRS[flag][1]}, got {item!r}")
            values[f"{key}.{name}"] = value if flag == "--data" else yaml.safe_load(value)
    return values


def _eval(args: argparse.Namespace) -> int:
    from gpg_vl.config import ConfigError, load_config, to_yaml
    from gpg_vl.eval_metrics import comparison_table
    from gpg_vl.evaluate import evaluate, evaluated_model, output_folder, trained_pixel_limits

    config_file = _config_file(args)
    if config_file is None and args.task is None:
        raise ConfigError("say what to evaluate: --task NAME, or --config FILE (a training run's config.yaml) "
                          "or --preset NAME")
    values = _eval_values(args)
    if args.task is not None and args.task != load_config(config_file, args.overrides).eval.task:
        values = {**ANOTHER_TASK, **values}
    if config_file is None and args.max_pixels is None and args.min_pixels is None and args.model:
        values = {**{f"model.{k}": v for k, v in trained_pixel_limits(args.model).items()}, **values}
    cfg = load_config(config_file, args.overrides, values)
    cfg.eval.model = evaluated_model(cfg, config_file)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    summary = evaluate(cfg)
    if summary is not None:
        print(comparison_table([summary]) + f"\n{cfg.eval.model} evaluated; records, summary and table in "
                                            f"{output_folder(cfg)}")
    return 0


def _eval_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpg_vl.evaluate import merge_summaries

    table = merge_summaries(args.summaries, args.names.split(",") if args.names else None)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")
    return 0


def _eval_parser(sub) -> None:
    from gpg_vl.config import Config, option_doc

    e = sub.add_parser("eval", help="evaluate a checkpoint on a task's split(s): the paper's metrics",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Starts from --config (a training run's config.yaml: its task, data, image sizes "
                                   "and newest checkpoint) or --preset, else the defaults; then section.option=value "
                                   "overrides; then the flags. Greedy by default; records, summary.json and table.md "
                                   "go to --output, and a rerun there continues where it stopped. Several "
                                   "processes: scripts/eval_task.sh.")
    e.add_argument("--config", help="YAML config: a preset file or a training run's config.yaml")
    e.add_argument("--preset", help="a bundled preset by name")
    e.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    e.add_argument("overrides", nargs="*", help="section.option=value (YAML values)")
    for flag, key in EVAL_FLAGS.items():
        doc, tp = option_doc(Config(), key)
        e.add_argument(flag, dest=_dest(flag), type=tp if tp in (int, float) else str, help=f"{doc} ({key})")
    for flag, (key, metavar) in EVAL_PAIRS.items():
        e.add_argument(flag, dest=_dest(flag), action="append", default=[], metavar=metavar,
                       help=f"{option_doc(Config(), key)[0]} (repeat; {key})")
    e.set_defaults(func=_eval)
    m = sub.add_parser("eval-merge", help="one comparison table of several evaluations (base, GRPO, GPG, ...)")
    m.add_argument("summaries", nargs="+", help="summary.json files or evaluation output folders")
    m.add_argument("--names", help="comma-separated row labels, one per summary (default: each summary's name)")
    m.add_argument("--out", help="also write the markdown table to this file")
    m.set_defaults(func=_eval_merge)


def _tasks(args: argparse.Namespace) -> int:
    from gpg_vl.catalog import task_help
    from gpg_vl.task import task_names

    print(task_help(args.name) if args.name else "\n".join(task_names()))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from gpg_vl.catalog import presets_table

    print(presets_table())
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpg_vl.metrics import METRICS_FILE, PLOT_FILE, plot_curves

    run = Path(args.run_dir)
    print(plot_curves(run / METRICS_FILE, args.out or run / PLOT_FILE))
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpg_vl.models.tiny import build_tiny_models

    for name, path in build_tiny_models(Path(args.out), seed=args.seed, head_dim=args.head_dim).items():
        print(f"{name}: {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from gpg_vl.bench import bench

    print(bench(args))
    return 0


def parser() -> argparse.ArgumentParser:
    from gpg_vl.config import help_text
    from gpg_vl.resources import TINY_MODELS

    p = argparse.ArgumentParser(prog="gpg-vl", description="Train vision-language and text models with GPG.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model on a task",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Options come from the defaults, then --config, then section.option=value "
                                   "overrides, e.g. train.max_steps=20 task.options.kinds=[count].",
                       epilog="options:\n" + help_text())
    t.add_argument("--config", help="YAML file with model/task/algorithm/rollout/train sections")
    t.add_argument("--preset", help="a bundled preset by name, e.g. shapes or lisa_tiny (`gpg-vl presets` lists them)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (what config.yaml would record) and stop")
    t.add_argument("overrides", nargs="*", help="section.option=value (YAML values)")
    t.set_defaults(func=_train)
    _eval_parser(sub)
    k = sub.add_parser("tasks", help="list the registered task names, one a line; with NAME, describe that task")
    k.add_argument("name", nargs="?", help="a task: its description, options, metric and presets")
    k.set_defaults(func=_tasks)
    ps = sub.add_parser("presets", help="list the bundled presets and the task each trains")
    ps.set_defaults(func=_presets)
    pl = sub.add_parser("plot", help="plot reward and accuracy of a run against step")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    pl.set_defaults(func=_plot)
    from gpg_vl.bench import add_arguments

    bn = sub.add_parser("bench", help="time the training step at real shapes against its floor (and TRL)",
                        description="Builds a real-vocabulary Qwen-VL offline, then runs each arm in its own process, "
                                    "alternating, and prints medians, phases, peak memory and ratios.")
    add_arguments(bn)
    bn.set_defaults(func=_bench)
    b = sub.add_parser("build-tiny", help="build the tiny random-init models used by the demo and tests")
    b.add_argument("--out", default=str(TINY_MODELS))
    b.add_argument("--seed", type=int, default=0)
    from gpg_vl.models.tiny import HEAD_DIM, HEAD_DIM_HELP

    b.add_argument("--head-dim", type=int, default=HEAD_DIM, help=HEAD_DIM_HELP)
    b.set_defaults(func=_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    from gpg_vl.config import ConfigError
    from gpg_vl.evaluation import EvalError
    from gpg_vl.task import UnknownTaskError

    p = parser()
    # Overrides may come before or after --config: argparse leaves the later ones over.
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or args.command not in ("train", "eval")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ConfigError, EvalError, UnknownTaskError, FileNotFoundError, ImportError) as err:
        print(f"gpg-vl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
