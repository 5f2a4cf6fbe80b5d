"""The `part-fast` command: train, eval, demo, show-cam, plot, check, bench. The only module that parses arguments.

Every option's --help ends with its default; every command that computes prints the device it uses first."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from .devices import AUTO, describe_device, parse_device, resolve_device
from .errors import (EXIT_DIVERGED, EXIT_USER_ERROR, USER_ERRORS, ConfigError, Interrupted, OutputWriteError,
                     TrainingDiverged, report)
from .extras import MissingExtraError
from .robustbench_protocol import BATCH_SIZE as RB_BATCH_SIZE
from .robustbench_protocol import DATASETS as RB_DATASETS
from .robustbench_protocol import N_EXAMPLES as RB_N_EXAMPLES
from .train import RESUMABLE_CHANGES, TrainConfig
from .eps_text import check_budget
from .train.config import flag_of

DEVICE_HELP = "auto (cuda when there is a GPU, else cpu) | cpu | cuda | cuda:N"
PROTOCOLS = ("attacks", "robustbench")
DEFAULT_ATTACKS = ("natural", "pgd20", "mma", "aa")


def fraction(text: str) -> float:
    """'8/255', '1.5/255', '0.03' or '2' -> float (a/b is float(a) / float(b), exactly Python's 8/255);
    anything else is an argparse error naming the form."""
    parts = text.strip().split("/")
    try:
        if len(parts) > 2:
            raise ValueError
        value = float(parts[0]) / float(parts[1]) if len(parts) == 2 else float(parts[0])
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 60,90, got {text!r}") from None


def with_default(help: str, default) -> str:
    """Help text ending in argparse's "(default: ...)", for every option that has one."""
    return f"{help} (default: {default})"


def _shown_default(f: dataclasses.Field) -> str:
    shown = f.metadata.get("shown")
    if shown is not None:
        return shown
    value = f.default
    if f.metadata["kind"] == "fraction":
        k = value * 255
        return f"{round(k):g}/255" if abs(k - round(k)) < 1e-9 else f"{value:g}"
    if f.metadata["kind"] == "negated":
        return "on"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


_PARSERS = {"int": int, "float": float, "fraction": fraction, "str": str, "int_list": int_list}


def _add_config_flag(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """One flag per TrainConfig field, its help and default taken from the field. The default is not set
    on the namespace (SUPPRESS): what the user typed is told apart from what was left unset, which is what
    lets --resume take the rest from the run's config.json."""
    meta = f.metadata
    kwargs = {"dest": f.name, "default": argparse.SUPPRESS,
              "help": f"{meta['help']} (default: {_shown_default(f)})"}
    kind = meta["kind"]
    if kind == "switch":
        kwargs["action"] = "store_true"
    elif kind == "negated":
        kwargs["action"] = "store_false"
    elif kind == "tristate":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _PARSERS[kind]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
    p.add_argument(flag_of(f.name), **kwargs)


def _train_parser(sub) -> None:
    changeable = ", ".join(flag_of(k) for k in RESUMABLE_CHANGES if k != "out")
    p = sub.add_parser(
        "train", help="adversarial training: AT, TRADES, MART and PART, PART-T, PART-M",
        description="Train with the released PART recipe; unset flags take the dataset's released value. "
                    "Exit codes: 0 done, 2 user error (one line), 3 diverged, 130 / 143 stopped by SIGINT / "
                    "SIGTERM after writing a checkpoint.")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run directory: created by a new run; with --resume / --auto-resume, the run to continue")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help=with_default("continue the run in RUN_DIR from its newest intact checkpoint, with the "
                                        f"settings of its config.json; flags given may change only {changeable}",
                                        "off"))
    mode.add_argument("--auto-resume", action="store_true",
                      help=with_default("resume when RUN_DIR holds a run, else start one: the same command line can "
                                        "be re-run by `torchrun --max-restarts` or a job scheduler", "off"))
    for f in dataclasses.fields(TrainConfig):
        if f.name != "out":
            _add_config_flag(p, f)


def given_settings(args) -> dict:
    """The TrainConfig settings typed on the command line (unset flags are absent)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name != "out" and hasattr(args, f.name)}


def config_from_args(args) -> TrainConfig:
    """A new run: the flags given, defaults for the rest. With --resume / --auto-resume and a run in
    RUN_DIR: its saved settings, with the flags given on top (train() refuses the unsafe changes)."""
    from .train.rundir import CONFIG, RunDirError, RunDirMissing, saved_config

    given = given_settings(args)
    saved = saved_config(args.out) if (args.resume or args.auto_resume) else None
    if args.resume and saved is None:
        if not Path(args.out).is_dir():
            raise RunDirMissing(f"--resume: run directory {args.out} does not exist")
        raise RunDirError(f"--resume: {args.out} holds no part_fast run (no {CONFIG})")
    if saved is not None:
        config = TrainConfig.from_json({**saved, **given, "out": args.out})
        warmup = saved.get("warmup")
        if config.is_part and isinstance(warmup, int) and isinstance(config.epochs, int) and config.epochs < warmup:
            # The warm-up is fixed by the run (not a resumable change): only --epochs can give.
            raise ConfigError(f"--epochs {config.epochs}: this run warms up for {warmup} epochs (its {CONFIG}); "
                              f"a resumed run's --epochs must be at least {warmup}")
        return config
    return TrainConfig(out=args.out, **given)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="robust accuracy of a checkpoint (table + JSON); --protocol robustbench for "
                                    "the leaderboard's evaluation and its model_info JSON")
    p.add_argument("checkpoint", help="RUN_DIR/last.pt")
    p.add_argument("--protocol", choices=PROTOCOLS, default="attacks",
                   help=with_default("attacks: the --attacks table on the run's test set; robustbench: "
                                     "RobustBench's benchmark() (first 10000 CIFAR test images in file order, "
                                     "original AutoAttack standard, its batching) and the leaderboard's "
                                     "model_info JSON", "attacks"))
    p.add_argument("--attacks", default=None,
                   help=with_default("comma-separated: natural, pgd20, mma, aa (original AutoAttack), aa-release "
                                     "(torchattacks' AA as released: 10 iterations, weaker); --protocol attacks "
                                     "only", ",".join(DEFAULT_ATTACKS)))
    p.add_argument("--dataset", choices=tuple(RB_DATASETS), default=None,
                   help=with_default("the test set of --protocol robustbench (the model must have as many "
                                     "classes)", "the run's dataset when it is one of these"))
    p.add_argument("--data-dir", default=None, help=with_default("dataset folder", "the run's"))
    p.add_argument("--test-subset", type=int, default=None,
                   help=with_default("first N test examples", f"the run's; {RB_N_EXAMPLES} with --protocol "
                                                              "robustbench"))
    p.add_argument("--batch-size", type=int, default=None,
                   help=with_default("evaluation batch (part of the RobustBench protocol: AutoAttack reseeds per "
                                     "batch)", f"256; {RB_BATCH_SIZE} with --protocol robustbench"))
    p.add_argument("--eps", type=fraction, default=8 / 255, help=with_default("L-inf budget, e.g. 8/255", "8/255"))
    p.add_argument("--step-size", type=fraction, default=None, help=with_default("PGD/MMA step", "the run's"))
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))
    p.add_argument("--seed", type=int, default=0, help=with_default("seed of the attacks' random starts "
                                                                    "(AutoAttack's seed too)", 0))
    p.add_argument("--json", default=None,
                   help=with_default("where to write the JSON (its folder is created)",
                                     "eval.json next to the checkpoint; with --protocol robustbench, "
                                     "robustbench-<dataset>-Linf.eval.json, and the model_info record "
                                     "robustbench-<dataset>-Linf.json beside it"))


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="AT vs PART on built-in data, a few minutes on a laptop CPU")
    p.add_argument("--out", default=None, help=with_default("output folder", "runs/demo-<time>"))
    p.add_argument("--seed", type=int, default=0, help=with_default("seed of both runs", 0))
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))


def _show_cam_parser(sub) -> None:
    p = sub.add_parser("show-cam", help="budget-map overlays for a few test images (PNG)")
    p.add_argument("checkpoint", help="RUN_DIR/last.pt")
    p.add_argument("--out", default="cams.png", help=with_default("the PNG to write (its folder is created)",
                                                                  "cams.png"))
    p.add_argument("--n", type=int, default=8, help=with_default("number of test images", 8))
    p.add_argument("--data-dir", default=None, help=with_default("dataset folder", "the run's"))
    p.add_argument("--mask", default=None, choices=("jet", "cam"), help=with_default("budget mask", "the run's"))
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="training curves of a run (PNG): loss, natural and PGD-20 accuracy, epoch time",
                       description="Draw RUN_DIR/metrics.jsonl: the training loss, the natural and PGD-20 "
                                   "accuracies, and each epoch's time split by stage (with --time-stages).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a part-fast train --out folder")
    p.add_argument("--out", default=None, help=with_default("the PNG to write (its folder is created)",
                                                            "RUN_DIR/curves.png"))


def _check_parser(sub) -> None:
    p = sub.add_parser(
        "check", help="prove and measure the GPU path (or the CPU's): correctness, a training step, timings",
        description="Four sections, each check with the figure it measured: the environment; every usable "
                    "backend on the device against the reference, opcheck and torch.compile; a CAM and a PART "
                    "training step on the device; timings side by side. Exit 1 when any check fails, else 0.")
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))
    p.add_argument("--out", default=None, metavar="DIR",
                   help=with_default("also write check-<date>-<machine>.json and .md into DIR", "no files"))
    p.add_argument("--quick", action="store_true", help=with_default("smaller cases and models: about a minute", "off"))


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="every benchmark section side by side (needs a source checkout: bench/)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to `python -m bench.run` (try --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="part-fast", description="Fast, reproducible PART (ICML 2024).")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _demo_parser(sub)
    _show_cam_parser(sub)
    _plot_parser(sub)
    _check_parser(sub)
    _bench_parser(sub)
    return parser


def cmd_train(args) -> int:
    from .train import train

    train(config_from_args(args), resume="auto" if args.auto_resume else args.resume)
    return 0


def _test_loader(config: TrainConfig, data_dir, test_subset, batch_size):
    from torch.utils.data import DataLoader

    from . import data as data_mod

    _, test_set, info = data_mod.build_datasets(config.dataset, data_dir or config.data_dir,
                                                test_subset=test_subset or config.test_subset, seed=config.seed)
    return DataLoader(test_set, batch_size=batch_size), test_set, info


def _start(command: str, device_name: str):
    """The device a command runs on, announced in one line before the work starts."""
    device = resolve_device(device_name)
    print(f"part-fast {command}: device {describe_device(device)}", flush=True)
    return device


def _create_folder_of(path: Path, flag: str) -> None:
    """Create the folder `path` goes into, so that a missing folder is never an error naming the writer's
    temporary file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputWriteError(f"{flag}: cannot create the folder {path.parent}: {err.strerror or err}") from None


@contextlib.contextmanager
def _writing(path: Path, flag: str):
    """An OSError of the write inside becomes a one-line error naming the user's path."""
    try:
        yield
    except OSError as err:
        raise OutputWriteError(f"{flag}: cannot write {path}: {err.strerror or err}") from None


def _positive(flag: str, value) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value}")


def _write_json(path: Path, obj, flag: str) -> None:
    from .files import atomic_write_text

    _create_folder_of(path, flag)
    with _writing(path, flag):
        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


def _check_eval_numbers(args) -> None:
    """Both protocols: the device name first (names before numbers), then the budget and the counts."""
    parse_device(args.device)
    check_budget("--eps", args.eps)
    _positive("--batch-size", args.batch_size)
    _positive("--test-subset", args.test_subset)


def cmd_eval(args) -> int:
    from .evaluate import ATTACK_LABELS, ATTACKS, evaluate
    from .train import load_model

    if args.protocol == "robustbench":
        return _eval_robustbench(args)
    if args.dataset is not None:
        raise ConfigError("--dataset belongs to --protocol robustbench; --protocol attacks uses the run's test set")
    attacks = tuple(a.strip() for a in (args.attacks or ",".join(DEFAULT_ATTACKS)).split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"--attacks: unknown {unknown}; choose from {', '.join(ATTACKS)}")
    _check_eval_numbers(args)
    if args.step_size is not None:
        check_budget("--step-size", args.step_size)
    device = _start("eval", args.device)
    model, config = load_model(args.checkpoint, device)
    loader, _, _ = _test_loader(config, args.data_dir, args.test_subset, args.batch_size or 256)
    step = args.step_size if args.step_size is not None else config.resolved().step_size
    result = evaluate(model, loader, attacks=attacks, eps=args.eps, alpha=step, device=device, seed=args.seed,
                      progress=sys.stderr.isatty(), on_checks=_print_checks)
    result.update({"checkpoint": str(args.checkpoint), "eps": args.eps, "step_size": step, "device": str(device),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "labels": {a: ATTACK_LABELS[a] for a in attacks}})
    lines = ["| attack | accuracy | seconds |", "|---|---|---|"]
    lines += [f"| {ATTACK_LABELS[a]} | {result[a]:.2f}% | {result['seconds'][a]:.1f} |" for a in attacks]
    print("\n".join(lines))
    print(f"({result['examples']} test examples)")
    _write_json(Path(args.json) if args.json else Path(args.checkpoint).with_name("eval.json"), result, "--json")
    return 0


def _print_checks(verdicts) -> None:
    """One line per AutoAttack check, then a warning when any failed (the number is then not to be trusted)."""
    for verdict in verdicts:
        print(verdict.line())
    failed = [v.check for v in verdicts if not v.passed]
    if failed:
        print(f"WARNING: AutoAttack check(s) failed ({', '.join(failed)}): its accuracy is not a reliable "
              "measure of this model's robustness", file=sys.stderr)
    sys.stdout.flush()


def _eval_robustbench(args) -> int:
    from .evaluate import num_classes_of
    from .robustbench_protocol import evaluate_robustbench, load_test_set, model_info
    from .train import load_model

    if args.attacks is not None:
        raise ConfigError("--attacks does not apply to --protocol robustbench: it runs the original AutoAttack, "
                          "version standard")
    if args.step_size is not None:
        raise ConfigError("--step-size does not apply to --protocol robustbench: AutoAttack sets its own steps")
    _check_eval_numbers(args)
    device = _start("eval", args.device)
    model, config = load_model(args.checkpoint, device)
    dataset = args.dataset or (config.dataset if config.dataset in RB_DATASETS else None)
    if dataset is None:
        raise ConfigError(f"--protocol robustbench: this run trained on {config.dataset!r}; RobustBench's L-inf "
                          f"leaderboards are {', '.join(RB_DATASETS)}: pass --dataset")
    classes = num_classes_of(model)
    if classes != RB_DATASETS[dataset]:
        raise ConfigError(f"--dataset {dataset} has {RB_DATASETS[dataset]} classes, the model {classes}")
    n_examples = args.test_subset or RB_N_EXAMPLES
    x, y = load_test_set(dataset, args.data_dir or config.data_dir, n_examples)
    batch_size = args.batch_size or RB_BATCH_SIZE
    print(f"RobustBench protocol: {dataset}, first {n_examples} test images, L-inf eps {args.eps:.6g}, original "
          f"AutoAttack standard, batch {batch_size}, seed {args.seed}", flush=True)
    result = evaluate_robustbench(model, x, y, dataset=dataset, eps=args.eps, batch_size=batch_size, device=device,
                                  seed=args.seed, on_checks=_print_checks)
    print(f"clean accuracy: {100 * result.clean_acc:.2f}% | AutoAttack accuracy: {100 * result.autoattack_acc:.2f}%"
          f" ({result.n_examples} examples, {result.autoattack})")
    run = Path(args.checkpoint).resolve().parent
    details = Path(args.json) if args.json else run / f"robustbench-{dataset}-Linf.eval.json"
    record = model_info(result, name=run.name, arch=config.arch,
                        footnote=f"{config.method.upper()} trained with part_fast; evaluated with {result.autoattack}, "
                              f"seed {result.seed}, batch {batch_size}")
    _write_json(run / f"robustbench-{dataset}-Linf.json", record, "checkpoint folder")
    _write_json(details, {**result.to_json(), "checkpoint": str(args.checkpoint), "device": str(device),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model_info": record}, "--json")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo
    from .plots import BUDGET_PNG, require_matplotlib

    resolve_device(args.device)  # a bad name fails here; run_demo says the device it uses as its first line
    require_matplotlib(BUDGET_PNG)  # now, not after minutes of training
    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(out, DemoSettings(seed=args.seed), device=args.device)
    return 0


def cmd_show_cam(args) -> int:
    import torch

    from .budget import PixelBudget
    from .models import CAM_LAYERS
    from .plots import BUDGET_PNG, budget_overlay_png, budget_title, require_matplotlib
    from .train import load_model

    parse_device(args.device)  # names before numbers
    require_matplotlib(BUDGET_PNG)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    device = _start("show-cam", args.device)
    model, config = load_model(args.checkpoint, device)
    _, test_set, info = _test_loader(config, args.data_dir, args.n, args.n)
    n = min(args.n, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(n)]).to(device)
    cfg = config.resolved()
    budget = PixelBudget(cfg.eps, cfg.eps_low, cfg.cam, args.mask or cfg.mask, layer=CAM_LAYERS.get(cfg.arch))
    eps_maps = budget(model, images)
    with torch.no_grad():
        pred = model(images).argmax(1).tolist()
    titles = [f"{info.classes[test_set[i][1]]}\npred {info.classes[p]}" for i, p in enumerate(pred)]
    from . import data as data_mod

    masks = data_mod.object_mask_of(test_set)
    out = Path(args.out)
    _create_folder_of(out, "--out")
    with _writing(out, "--out"):
        path = budget_overlay_png(out, images, eps_maps, cfg.eps, titles, None if masks is None else masks[:n],
                                  suptitle=budget_title(cfg.arch, cfg.cam, args.mask or cfg.mask, cfg.eps, cfg.eps_low))
    print(f"wrote {path}")
    return 0


def _run_title(config: dict, where: Path) -> str:
    """'part, cifar10, resnet18, eps 8/255 (0.0314)': what a run's figure is of."""
    from .eps_text import eps_text
    from .train.rundir import RunDirError

    missing = [k for k in ("method", "dataset", "arch", "eps") if k not in config]
    if missing:
        raise RunDirError(f"{where} is damaged (no {', '.join(missing)})")
    if not isinstance(config["eps"], (int, float)) or isinstance(config["eps"], bool):
        raise RunDirError(f"{where} is damaged (eps is {config['eps']!r}, not a number)")
    return f"{config['method']}, {config['dataset']}, {config['arch']}, eps {eps_text(config['eps'])}"


def cmd_plot(args) -> int:
    from . import plots
    from .train.rundir import CONFIG, RunDirError, RunDirMissing, read_metrics, saved_config

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
    _create_folder_of(out, "--out")
    with _writing(out, "--out"):
        path = plots.training_curves_png(records, out, title)
    print(f"wrote {path}")
    return 0


def cmd_check(args) -> int:
    from .check import run_check

    if args.out is not None:
        out = Path(args.out)
        _create_folder_of(out / "check.json", "--out")
        with _writing(out, "--out"):  # the checks catch their own errors: an OSError here is the report's write
            report = run_check(args.device, quick=args.quick, out=out)
    else:
        report = run_check(args.device, quick=args.quick)
    failed = "; ".join(f"{o.section}: {o.name}" for o in report.failed)
    print(f"part-fast check: {'passed' if report.passed else 'FAILED (' + failed + ')'} in {report.seconds:.0f} s")
    return 0 if report.passed else 1


def cmd_bench(args) -> int:
    import subprocess

    # The harness lives in the source tree's bench/, which the package never imports: run it as a program.
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        raise FileNotFoundError(f"part-fast bench needs a source checkout of part_fast (no bench/run.py under {root}); "
                                "install with `pip install -e .` from a clone")
    return subprocess.run([sys.executable, "-m", "bench.run", *args.bench_args], cwd=root).returncode


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "show-cam": cmd_show_cam, "plot": cmd_plot,
            "check": cmd_check, "bench": cmd_bench}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the harness's own parser
        try:
            return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
        except FileNotFoundError as err:
            report(f"part-fast bench: error: {err}")
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"part-fast {args.command}"
    try:
        return COMMANDS[args.command](args)
    except Interrupted as err:
        if _is_rank0():
            report(f"{name}: {err}; resume with: {_resume_command(args.out)}")
        return err.exit_code
    except (*USER_ERRORS, MissingExtraError) as err:
        # A user error: one clear line, no traceback.
        report(f"{name}: error: {err}")
        return EXIT_USER_ERROR
    except TrainingDiverged as err:
        report(f"{name}: stopped: {err}")
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        if _is_rank0():
            after = _after_train_interrupt(args.out) if args.command == "train" else ""
            report(f"{name}: interrupted at once, nothing more saved{after}")
        return 130


def _after_train_interrupt(out: str) -> str:
    """What a run stopped at once (a second Ctrl-C) left, and how to go on from it."""
    from .train.checkpoint import LAST, PREVIOUS
    from .train.rundir import holds_run

    resume = _resume_command(out)
    if any((Path(out) / name).is_file() for name in (LAST, PREVIOUS)):
        return f"; the checkpoints in {out} are kept; resume with: {resume}"
    if holds_run(out):
        return f"; no checkpoint was written yet: {resume} starts the run again from its first step"
    return ""


def _resume_command(out: str) -> str:
    """How to go on: one process resumes with part-fast; a torchrun job with its own launch line, else it would
    come back as a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"the same torchrun command with --resume (or --auto-resume), e.g. torchrun ... -m part_fast train --out {out} --resume"
    return f"part-fast train --out {out} --resume"


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
