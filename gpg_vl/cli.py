"""The `gpg-vl` command: train, tasks, plot, build-tiny. No logic of its own."""

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

    for name, path in build_tiny_models(Path(args.out), seed=args.seed).items():
        print(f"{name}: {path}")
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
    k = sub.add_parser("tasks", help="list the registered task names, one a line")
    k.set_defaults(func=_tasks)
    pl = sub.add_parser("plot", help="plot reward and accuracy of a run against step")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    pl.set_defaults(func=_plot)
    b = sub.add_parser("build-tiny", help="build the tiny random-init models used by the demo and tests")
    b.add_argument("--out", default="assets/tiny")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    from gpg_vl.config import ConfigError
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
    except (ConfigError, UnknownTaskError, FileNotFoundError) as err:
        print(f"gpg-vl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
