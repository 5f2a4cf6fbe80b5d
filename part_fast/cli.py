"""The `part-fast` command: train, eval, demo, show-cam. The only module that parses arguments."""
from __future__ import annotations

import argparse
import json
import sys
import time
import math
from pathlib import Path

from .evaluate import MissingExtraError
from .train import METHODS, TrainConfig, TrainingDiverged


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


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="adversarial training: AT, TRADES, MART and PART, PART-T, PART-M",
                       description="Train with the released PART recipe; unset flags take the dataset's released value.")
    p.add_argument("--dataset", default="cifar10", help="cifar10 | svhn | tinyimagenet | imagefolder | shapes")
    p.add_argument("--data-dir", default=None, help="dataset folder (not needed for shapes)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 / SVHN into --data-dir if missing")
    p.add_argument("--arch", default="resnet18", help="resnet18 | preact-resnet18 | wrn34-10 | cnn-small | a torchvision model name")
    p.add_argument("--method", default="part", choices=METHODS)
    p.add_argument("--out", required=True, help="run directory (must not exist unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--warmup", type=int, default=20, help="epochs of the base method before PART (PART methods)")
    p.add_argument("--lr", type=float, default=None, help="default: the dataset's released value (0.01)")
    p.add_argument("--milestones", type=int_list, default=(60, 90),
                   help="epochs after the warm-up where the LR drops 10x (default 60,90)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=None, help="default: 2e-4 (SVHN 0.0035)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split across processes)")
    p.add_argument("--eps", type=fraction, default=8 / 255)
    p.add_argument("--eps-low", type=fraction, default=7 / 255)
    p.add_argument("--steps", type=int, default=10, help="attack steps")
    p.add_argument("--step-size", type=fraction, default=None, help="default: 2/255 (SVHN 1/255)")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES / MART beta")
    p.add_argument("--cam", default="gradcam", help="gradcam | xgradcam | layercam")
    p.add_argument("--mask", default="jet", choices=("jet", "cam"))
    p.add_argument("--start", default="uniform", choices=("uniform", "release"),
                   help="AT attack start: inside the per-pixel box (uniform) or the release's global-eps start")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop / flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N examples")
    p.add_argument("--test-subset", type=int, default=None, help="test on the first N examples")
    p.add_argument("--eval-examples", type=int, default=1000, help="test examples for per-epoch accuracy (0: none)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: one GPU per process)")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16"), help="autocast the model (budget and x_adv stay float32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    p.add_argument("--log-steps", action="store_true", help="also write RUN_DIR/steps.jsonl, one line per step")


def _config_from_args(args) -> TrainConfig:
    return TrainConfig(
        out=args.out, dataset=args.dataset, data_dir=args.data_dir, download=args.download, arch=args.arch,
        method=args.method, epochs=args.epochs, warmup=args.warmup, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, milestones=args.milestones, batch_size=args.batch_size, eps=args.eps,
        eps_low=args.eps_low, steps=args.steps, step_size=args.step_size, beta=args.beta, cam=args.cam, mask=args.mask,
        start=args.start, augment=args.augment, seed=args.seed, train_subset=args.train_subset,
        test_subset=args.test_subset, device=args.device, workers=args.workers, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, sync_bn=args.sync_bn, eval_examples=args.eval_examples,
        log_steps=args.log_steps)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="robust accuracy of a checkpoint (table + JSON)")
    p.add_argument("checkpoint", help="RUN_DIR/last.pt")
    p.add_argument("--attacks", default="natural,pgd20,mma,aa",
                   help="comma-separated: natural, pgd20, mma, aa (original AutoAttack), aa-release (torchattacks)")
    p.add_argument("--data-dir", default=None, help="default: the run's")
    p.add_argument("--test-subset", type=int, default=None, help="first N test examples (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=fraction, default=8 / 255)
    p.add_argument("--step-size", type=fraction, default=None, help="PGD/MMA step (default: the run's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="where to write the JSON (default: next to the checkpoint)")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="AT vs PART on built-in data, CPU, a few minutes")
    p.add_argument("--out", default=None, help="output folder (default: runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)


def _show_cam_parser(sub) -> None:
    p = sub.add_parser("show-cam", help="budget-map overlays for a few test images (PNG)")
    p.add_argument("checkpoint", help="RUN_DIR/last.pt")
    p.add_argument("--out", default="cams.png")
    p.add_argument("--n", type=int, default=8, help="number of test images")
    p.add_argument("--data-dir", default=None, help="default: the run's")
    p.add_argument("--mask", default=None, choices=("jet", "cam"), help="default: the run's")
    p.add_argument("--device", default="cpu")


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
    _bench_parser(sub)
    return parser


def cmd_train(args) -> int:
    from .train import train

    train(_config_from_args(args), resume=args.resume)
    return 0


def _test_loader(config: TrainConfig, data_dir, test_subset, batch_size):
    from torch.utils.data import DataLoader

    from . import data as data_mod

    _, test_set, info = data_mod.build_datasets(config.dataset, data_dir or config.data_dir,
                                                test_subset=test_subset or config.test_subset, seed=config.seed)
    return DataLoader(test_set, batch_size=batch_size), test_set, info


def cmd_eval(args) -> int:
    from .evaluate import ATTACKS, evaluate
    from .train import load_model, atomic_write_text

    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"--attacks: unknown {unknown}; choose from {', '.join(ATTACKS)}")
    model, config = load_model(args.checkpoint, args.device)
    loader, _, _ = _test_loader(config, args.data_dir, args.test_subset, args.batch_size)
    step = args.step_size if args.step_size is not None else config.resolved().step_size
    result = evaluate(model, loader, attacks=attacks, eps=args.eps, alpha=step, device=args.device, seed=args.seed,
                      progress=sys.stderr.isatty())
    result.update({"checkpoint": str(args.checkpoint), "eps": args.eps, "step_size": step,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    lines = ["| attack | accuracy | seconds |", "|---|---|---|"]
    lines += [f"| {a} | {result[a]:.2f}% | {result['seconds'][a]:.1f} |" for a in attacks]
    print("\n".join(lines))
    print(f"({result['examples']} test examples)")
    path = Path(args.json) if args.json else Path(args.checkpoint).with_name("eval.json")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo

    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(out, DemoSettings(seed=args.seed))
    return 0


def cmd_show_cam(args) -> int:
    import torch

    from .budget import PixelBudget
    from .models import CAM_LAYERS
    from .plots import budget_overlay_png
    from .train import load_model

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, config = load_model(args.checkpoint, args.device)
    _, test_set, info = _test_loader(config, args.data_dir, args.n, args.n)
    n = min(args.n, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(n)]).to(args.device)
    cfg = config.resolved()
    budget = PixelBudget(cfg.eps, cfg.eps_low, cfg.cam, args.mask or cfg.mask, layer=CAM_LAYERS.get(cfg.arch))
    eps_maps = budget(model, images)
    with torch.no_grad():
        pred = model(images).argmax(1).tolist()
    titles = [f"{info.classes[test_set[i][1]]}\npred {info.classes[p]}" for i, p in enumerate(pred)]
    from . import data as data_mod

    masks = data_mod.object_mask_of(test_set)
    path = budget_overlay_png(args.out, images, eps_maps, cfg.eps, titles, None if masks is None else masks[:n])
    print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    import subprocess

    # The harness lives in the source tree's bench/, which the package never imports: run it as a program.
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        raise FileNotFoundError(f"part-fast bench needs a source checkout of part_fast (no bench/run.py under {root}); "
                                "install with `pip install -e .` from a clone")
    return subprocess.run([sys.executable, "-m", "bench.run", *args.bench_args], cwd=root).returncode


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "show-cam": cmd_show_cam, "bench": cmd_bench}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the harness's own parser
        try:
            return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
        except FileNotFoundError as err:
            print(f"part-fast bench: error: {err}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, MissingExtraError) as err:
        # A user error: one clear line, no traceback.
        print(f"part-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"part-fast {args.command}: stopped: {err}; the last good checkpoint is kept", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
