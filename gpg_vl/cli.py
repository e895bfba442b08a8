"""The `gpg-vl` command: train, eval, eval-merge, tasks, plot, bench, build-tiny. No logic of its own."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from gpg_vl.config import load_config
    from gpg_vl.trainer import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=latest")
    train(load_config(args.config, overrides))
    return 0


# gpg-vl eval: EvalSettings fields whose option is named otherwise, and those given as repeated KEY=VALUE.
EVAL_FLAGS = {"output_dir": "--output", "benchmarks": "--data", "splits": "--split", "options": "--option"}
EVAL_METAVARS = {"benchmarks": "NAME=PATH", "options": "KEY=VALUE", "splits": "SPLIT[,SPLIT]"}


def _key_values(items: list[str], flag: str, parse) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        pairs[key] = parse(value)
    return pairs


def _eval(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from gpg_vl.eval_metrics import comparison_table
    from gpg_vl.evaluate import EvalError, EvalSettings, evaluate

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)}
    try:
        values["benchmarks"] = _key_values(args.benchmarks, "--data", str)
        values["options"] = _key_values(args.options, "--option", yaml.safe_load)
    except (ValueError, yaml.YAMLError) as err:
        raise EvalError(str(err)) from err
    values["splits"] = [s.strip() for s in args.splits.split(",")]
    settings = EvalSettings(**values)
    summary = evaluate(settings)
    if summary is not None:
        print(comparison_table([summary]) + f"\nrecords, summary and table in {settings.output()}")
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
    import dataclasses

    from gpg_vl.config import field_docs
    from gpg_vl.evaluate import EvalSettings

    e = sub.add_parser("eval", help="evaluate a checkpoint on a task's test split(s): the paper's metrics",
                       description="Greedy by default; records, summary.json and table.md go to --output, and a "
                                   "rerun there continues where it stopped. Several processes: scripts/eval_task.sh.")
    docs = field_docs(EvalSettings)
    for f in dataclasses.fields(EvalSettings):
        flag = EVAL_FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            e.add_argument(flag, dest=f.name, required=True, help=docs[f.name])
        elif f.name in ("benchmarks", "options"):
            e.add_argument(flag, dest=f.name, action="append", default=[], metavar=EVAL_METAVARS[f.name],
                           help=docs[f.name])
        elif f.name == "splits":
            e.add_argument(flag, dest=f.name, default="test", metavar=EVAL_METAVARS[f.name], help=docs[f.name])
        else:
            e.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                           help=f"{docs[f.name]} (default {f.default!r})")
    e.set_defaults(func=_eval)
    m = sub.add_parser("eval-merge", help="one comparison table of several evaluations (base, GRPO, GPG, ...)")
    m.add_argument("summaries", nargs="+", help="summary.json files or evaluation output folders")
    m.add_argument("--names", help="comma-separated row labels, one per summary (default: each summary's name)")
    m.add_argument("--out", help="also write the markdown table to this file")
    m.set_defaults(func=_eval_merge)


def _tasks(args: argparse.Namespace) -> int:
    from gpg_vl.task import task_names

    print("\n".join(task_names()))
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

    p = argparse.ArgumentParser(prog="gpg-vl", description="Train vision-language and text models with GPG.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model on a task",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Options come from the defaults, then --config, then section.option=value "
                                   "overrides, e.g. train.max_steps=20 task.options.kinds=[count].",
                       epilog="options:\n" + help_text())
    t.add_argument("--config", help="YAML file with model/task/algorithm/rollout/train sections")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    t.add_argument("overrides", nargs="*", help="section.option=value (YAML values)")
    t.set_defaults(func=_train)
    _eval_parser(sub)
    k = sub.add_parser("tasks", help="list the registered task names, one a line")
    k.set_defaults(func=_tasks)
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
    b.add_argument("--out", default="assets/tiny")
    b.add_argument("--seed", type=int, default=0)
    from gpg_vl.models.tiny import HEAD_DIM, HEAD_DIM_HELP

    b.add_argument("--head-dim", type=int, default=HEAD_DIM, help=HEAD_DIM_HELP)
    b.set_defaults(func=_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    from gpg_vl.config import ConfigError
    from gpg_vl.evaluate import EvalError
    from gpg_vl.task import UnknownTaskError

    p = parser()
    # Overrides may come before or after --config: argparse leaves the later ones over.
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or args.command != "train"]
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
