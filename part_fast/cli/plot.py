"""`part-fast plot`: its parser and the command (a run's training curves from its metrics.jsonl, a PNG)."""
from __future__ import annotations

from pathlib import Path

from .common import create_folder_of, with_default, writing


def plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="training curves of a run (PNG): loss, natural and PGD-20 accuracy, epoch time",
                       description="Draw RUN_DIR/metrics.jsonl: the training loss, the natural and PGD-20 "
                                   "accuracies, and each epoch's time split by stage (with --time-stages).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a part-fast train --out folder")
    p.add_argument("--out", default=None, help=with_default("the PNG to write (its folder is created)",
                                                            "RUN_DIR/curves.png"))


def _run_title(config: dict, where: Path) -> str:
    """'part, cifar10, resnet18, eps 8/255 (0.0314)': what a run's figure is of."""
    from ..eps_text import eps_text
    from ..train.rundir import RunDirError

    missing = [k for k in ("method", "dataset", "arch", "eps") if k not in config]
    if missing:
        raise RunDirError(f"{where} is damaged (no {', '.join(missing)})")
    if not isinstance(config["eps"], (int, float)) or isinstance(config["eps"], bool):
        raise RunDirError(f"{where} is damaged (eps is {config['eps']!r}, not a number)")
    return f"{config['method']}, {config['dataset']}, {config['arch']}, eps {eps_text(config['eps'])}"


def cmd_plot(args) -> int:
    from .. import plots
    from ..train.rundir import CONFIG, RunDirError, RunDirMissing, read_metrics, saved_config

    plots.require_matplotlib(plots.CURVES_PNG)
    run = Path(args.run_dir)
    if not run.is_dir():
        raise RunDirMissing(f"run directory {run} does not exist")
    saved = saved_config(run)
    if saved is None:
        raise RunDirError(f"{run} holds no part_fast run (no {CONFIG})")
    title = _run_title(saved, run / CONFIG)
    records = read_metrics(run)
    out = Path(args.out) if args.out else run / "curves.png"
    create_folder_of(out, "--out")
    with writing(out, "--out"):
        path = plots.training_curves_png(records, out, title)
    print(f"wrote {path}")
    return 0
