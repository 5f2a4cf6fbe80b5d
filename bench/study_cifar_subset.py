"""Real-data study (issue 5): AT vs PART (jet mask) vs PART (cam mask) on a 10 000 / 2 000 CIFAR-10 subset.

    python -m bench.study_cifar_subset --readme README.md               # the study (hours on 2 CPU cores)
    python -m bench.study_cifar_subset --report-only --readme README.md # re-render from the stored runs
    python -m bench.study_cifar_subset --from-json bench/results/study_cifar_subset.json --readme README.md
                                                                        # re-render the committed report alone
    python -m bench.study_cifar_subset --epochs 1 --warmup 0 --seeds 0 --train-subset 256 \\
        --test-subset 64 --work /tmp/study_smoke --threads 1            # smoke check by hand (~1-2 min)

Never run in CI: the full study takes hours. tests/test_study_verdict.py imports the verdict rule
(aggregate, compare, headline) and checks it on made-up numbers; no test trains or evaluates anything here.
Run the smoke line above by hand after changing this file, then run it again (it must skip every run and
only re-render), then add `--report-only`.

What it does. `../shared/data/cifar10-subset.tar` (real CIFAR-10, ImageFolder layout, 1000 train / 200
test images per class) is extracted once into `<work>/data/`. For seeds 0, 1, 2 and the methods AT, PART
(jet mask: the released per-channel budget) and PART (cam mask: the paper's channel-shared budget), the
library's trainer (`part_fast.train.train`) trains `arch="resnet-small"` (ResNet-10 at width 16, GradCAM at
layer4) into `<work>/runs/<name>` (`at-seed0`, `part-jet-seed0`, `part-cam-seed0`, ...), and
`part_fast.evaluation.evaluate` measures natural, PGD-20 and MMA accuracy on the whole test split
(eps 8/255, step 2/255, evaluation seed 0 for every run). Runs go seed by seed (all methods of seed 0
first), so an interrupted study still has comparable methods.

Recipe (the released one is 80 epochs of ResNet-18 at lr 0.01 on 50 000 images; this machine affords ~1/100
of its compute, so the schedule is shortened and the step size raised to match):
- 15 epochs, batch 128: 78 steps per epoch, ~1 200 steps in all. PART methods train their first 5 epochs
  as AT (the release's warm-up, scaled 20/80 -> 5/15), then 10 PART epochs. AT gets `warmup=5` too: the
  trainer counts LR milestones after the warm-up for every method, so all three share one LR schedule and
  differ only in the attack budget.
- SGD lr 0.05, momentum 0.9: with ~1 200 steps from scratch, the release's 0.01 leaves a small BatchNorm
  ResNet far from converged; 0.1 (the usual AT value for 200-epoch CIFAR runs) is noisy on a 10 000-image
  set and makes seed-to-seed spread larger than the effect being measured. 0.05 is in between.
- weight decay 5e-4 (the common CIFAR AT value, stronger than the release's 2e-4): 10 000 images overfit
  sooner than 50 000, and robust overfitting is the usual failure of short AT runs on small sets.
- LR x0.1 for the last fifth of the epochs (the last 3 of 15: milestone 8 counted after the 5 warm-up
  epochs), so every run ends at a settled low-LR point instead of wherever the last noisy step put it.
- PGD-5 training attack, step 2/255 (5 x 2/255 = 10/255 > eps: the box is reachable from any start), eps
  8/255, eps_low 7/255 (the paper's), uniform random start in the per-pixel box.

Subsets (`--train-subset` / `--test-subset`, for smoke runs): the library keeps the first N items of an
ImageFolder split, which is sorted by class, so the first 256 training images would all be airplanes. This
script instead links a class-balanced subset (round robin over the classes, first files of each class)
into `<work>/data/cifar10-subset-balanced-train<N>-test<M>/` and trains on all of it.

Resumable. A run whose `last.pt` holds `epoch == epochs` is not trained again; a partial RUN_DIR is
continued with `train(config, resume=True)` (exactly, as the trainer guarantees); each run's evaluation
is stored in RUN_DIR/study_eval.json (temp file + os.replace) and skipped when present. Killing the script
and running the same command again therefore continues where it stopped. `<work>/study.json` holds the
study's settings (a rerun with other settings in the same --work is refused: use another --work) and one
record per session (command, wall time), from which the report's wall time is summed.

The report (reading the runs back, the verdict rule, the markdown and the PNG) is bench/study_report.py.
Outputs: `<out>.json` (per run and per method), `<out>.md` (table, verdict sentence, command, wall time)
and `<out>.png` (natural vs PGD-20 accuracy: one point per run, method means with +-1 std error bars).
`<out>` is bench/results/study_cifar_subset with the default --work, else <work>/study_cifar_subset, so a
smoke run never overwrites the study's results. `--readme FILE` also replaces FILE's
`<!-- study:start -->` ... `<!-- study:end -->` block with the markdown.

Checkpoints (`<work>/runs/`) and the extracted third-party images (`<work>/data/`) must not be committed:
ignore the whole default work dir, `bench/results/study/`.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import shlex
import shutil
import sys
import tarfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bench.common import Stopwatch, show_messages
from bench.study_report import (
    METHODS,
    README_END,
    README_START,
    build_report,
    check_readme,
    plural,
    read_json,
    write_json,
    write_outputs,
)
from part_fast.data import build_datasets
from part_fast.data.folders import classes_interleaved
from part_fast import evaluate
from part_fast.logs import watching
from part_fast.train import TrainConfig, load_checkpoint, load_model, train
from part_fast.train import loop as train_loop

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = ROOT / "bench" / "results" / "study"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.tar"
DEFAULT_OUT = ROOT / "bench" / "results" / "study_cifar_subset"
TAR_TOP = "cifar10-subset"

# The fixed part of the recipe (see the module docstring for why).
ARCH = "resnet-small"
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
BATCH = 128
STEPS, STEP_SIZE = 5, 2 / 255
EPS, EPS_LOW = 8 / 255, 7 / 255
CAM = "gradcam"
EVAL_ATTACKS = ("natural", "pgd20", "mma")
EVAL_SEED = 0
EVAL_BATCH = 200
logger = logging.getLogger(__name__)


def run_name(method: str, mask: str | None, seed: int) -> str:
    return f"{method}-seed{seed}" if mask is None else f"{method}-{mask}-seed{seed}"


def default_milestones(epochs: int, warmup: int) -> tuple[int, ...]:
    """One x0.1 drop for the last fifth of the epochs (at least one epoch), counted after the warm-up as the
    trainer counts milestones; none if that drop would fall inside the warm-up or the run has one epoch."""
    low = max(1, round(epochs / 5))
    milestone = epochs - warmup - low + 1
    return (milestone,) if epochs >= 2 and milestone >= 1 else ()


# ------------------------------------------------------------------------------------------------- data
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_once(tar_path: Path, data_root: Path) -> Path:
    """<data_root>/cifar10-subset with train/ and test/, extracted from the tar unless already there
    (into a temporary folder, then renamed: an interrupted extraction leaves no half tree behind)."""
    target = data_root / TAR_TOP
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    if target.exists():
        raise SystemExit(f"{target} exists but has no train/ and test/: remove it and rerun")
    if not tar_path.is_file():
        raise SystemExit(f"no data at {tar_path} (pass --data PATH/TO/cifar10-subset.tar)")
    data_root.mkdir(parents=True, exist_ok=True)
    tmp = data_root / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracting %s into %s", tar_path, target)
    try:
        with tarfile.open(tar_path) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if (not parts or parts[0] != TAR_TOP or ".." in parts or member.name.startswith("/")
                        or not (member.isfile() or member.isdir())):
                    raise SystemExit(f"{tar_path}: unexpected member {member.name!r} (expected regular files "
                                     f"under {TAR_TOP}/)")
            archive.extractall(tmp, filter="data")
        os.replace(tmp / TAR_TOP, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def balanced_tree(full: Path, data_root: Path, n_train: int | None, n_test: int | None) -> Path:
    """`full` itself without subsets; else a tree of symlinks holding the first N files of each split taken
    round robin over the classes (so every class is present in equal share)."""
    if n_train is None and n_test is None:
        return full
    name = f"{TAR_TOP}-balanced-train{n_train or 'all'}-test{n_test or 'all'}"
    target = data_root / name
    if target.is_dir():
        return target
    tmp = data_root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split, n in (("train", n_train), ("test", n_test)):
            classes = sorted(d.name for d in (full / split).iterdir() if d.is_dir())
            files = {c: sorted(p for p in (full / split / c).iterdir() if p.is_file()) for c in classes}
            total = sum(len(v) for v in files.values())
            n = total if n is None else n
            if not len(classes) <= n <= total:
                raise SystemExit(f"--{split}-subset {n}: must be between {len(classes)} (one image per class) "
                                 f"and the {total} images of the {split} split")
            # Round robin over the classes, each in file order: the order part_fast's folder datasets list.
            chosen = classes_interleaved([(path, k) for k, c in enumerate(classes) for path in files[c]])
            for path, k in chosen[:n]:
                (tmp / split / classes[k]).mkdir(parents=True, exist_ok=True)
                os.symlink(path.resolve(), tmp / split / classes[k] / path.name)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------ study state
def make_spec(args, data_sha: str) -> dict:
    """Everything that decides a run's numbers (seeds aside): a work dir holds one spec."""
    return {
        "data_sha256": data_sha, "arch": ARCH, "epochs": args.epochs, "warmup": args.warmup,
        "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
        "milestones": list(default_milestones(args.epochs, args.warmup)), "batch_size": BATCH,
        "steps": STEPS, "step_size": STEP_SIZE, "eps": EPS, "eps_low": EPS_LOW, "cam": CAM,
        "train_subset": args.train_subset, "test_subset": args.test_subset,
        "eval": {"attacks": list(EVAL_ATTACKS), "eps": EPS, "alpha": STEP_SIZE, "seed": EVAL_SEED},
    }


def open_study(work: Path, spec: dict, seeds: list[int], command: str) -> dict:
    path = work / "study.json"
    study = read_json(path)
    if study is not None and study["spec"] != spec:
        old, new = study["spec"], spec
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                         if old.get(k) != new.get(k))
        raise SystemExit(f"{work} holds a study with other settings ({diff}); rerun with its settings to "
                         f"continue it, or choose another --work")
    if study is None:
        study = {"spec": spec, "seeds": [], "sessions": []}
    study["seeds"] = sorted(set(study["seeds"]) | set(seeds))
    study["sessions"].append({"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "seconds": 0.0, "trained": [], "evaluated": [], "finished": False,
                              "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()})
    write_json(path, study)
    return study


def completed_epochs(run_dir: Path) -> int:
    ckpt = run_dir / "last.pt"
    return int(load_checkpoint(ckpt)["epoch"]) if ckpt.exists() else 0


def train_config(spec: dict, run_dir: Path, data_dir: Path, method: str, mask: str | None, seed: int,
                 device: str) -> TrainConfig:
    return TrainConfig(
        out=str(run_dir), dataset="imagefolder", data_dir=str(data_dir), arch=spec["arch"], method=method,
        epochs=spec["epochs"], warmup=spec["warmup"], lr=spec["lr"], momentum=spec["momentum"],
        weight_decay=spec["weight_decay"], milestones=tuple(spec["milestones"]), batch_size=spec["batch_size"],
        eps=spec["eps"], eps_low=spec["eps_low"], steps=spec["steps"], step_size=spec["step_size"],
        cam=spec["cam"], mask=mask or TrainConfig.mask, seed=seed, device=device, eval_examples=0)


def run_one(name: str, method: str, mask: str | None, seed: int, spec: dict, work: Path, data_dir: Path,
            test_loader, device: str, on_train=lambda: None, on_epoch=lambda: None) -> tuple[bool, bool]:
    """Train (or continue, or skip) and evaluate (or skip) one run; returns (trained, evaluated).
    `on_train` is called before training starts (the session records the run even if killed in it),
    `on_epoch` after each line the trainer logs (once per epoch)."""
    run_dir = work / "runs" / name
    epochs = spec["epochs"]
    trained = evaluated = False
    done = completed_epochs(run_dir)
    if done >= epochs:
        logger.info("[%s] trained (%s): skip training", name, plural(done, "epoch"))
    else:
        config = train_config(spec, run_dir, data_dir, method, mask, seed, device)
        resume = run_dir.exists()
        logger.info("[%s] %s: %s%s, seed %d, %s", name, f"continue after epoch {done}" if resume else "train", method,
                    "" if mask is None else " mask " + mask, seed, plural(epochs, "epoch"))
        on_train()

        def epoch_line(line):
            logger.info("[%s] %s", name, line)
            on_epoch()

        with watching(train_loop.__name__, epoch_line):  # the trainer's lines, under this run's name
            train(config, resume=resume)
        trained = True

    eval_path = run_dir / "study_eval.json"
    saved = read_json(eval_path)
    if saved is not None and saved.get("spec") == spec["eval"] and saved.get("checkpoint_epoch") == epochs:
        logger.info("[%s] evaluated: skip evaluation", name)
        return trained, evaluated
    model, _ = load_model(run_dir / "last.pt", device=device)
    watch = Stopwatch()
    result = evaluate(model, test_loader, attacks=EVAL_ATTACKS, eps=spec["eval"]["eps"], alpha=spec["eval"]["alpha"],
                      device=device, seed=spec["eval"]["seed"], progress=sys.stderr.isatty())
    seconds = watch.elapsed()
    record = {"spec": spec["eval"], "checkpoint_epoch": epochs, "examples": result["examples"],
              "accuracy": {a: result[a] for a in EVAL_ATTACKS}, "attack_seconds": result["seconds"],
              "eval_seconds": seconds}
    write_json(eval_path, record)
    logger.info(f"[{name}] natural {result['natural']:.2f}% | PGD-20 {result['pgd20']:.2f}% | MMA {result['mma']:.2f}% "
                f"on {result['examples']} test images ({seconds:.0f}s)")
    return trained, True


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the tar (default {DEFAULT_DATA})")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="study folder: data/, runs/, study.json (default bench/results/study)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output prefix for .json/.md/.png (default bench/results/study_cifar_subset with the "
                             "default --work, else <work>/study_cifar_subset)")
    parser.add_argument("--readme", help=f"also replace this file's {README_START} ... {README_END} block")
    parser.add_argument("--report-only", action="store_true", help="train and evaluate nothing: re-render the report")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="read nothing but this earlier report (<out>.json): render its .md, .png (and --readme)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5, help="AT warm-up epochs of PART (and LR-milestone origin)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--train-subset", type=int, default=None, help="class-balanced training subset size")
    parser.add_argument("--test-subset", type=int, default=None, help="class-balanced test subset size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        args.seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or min(args.seeds) < 0:
        parser.error("--seeds needs at least one seed >= 0")
    if args.epochs < 1 or not 0 <= args.warmup <= args.epochs:
        parser.error("need --epochs >= 1 and 0 <= --warmup <= --epochs")
    if args.train_subset is not None and args.train_subset < BATCH:
        parser.error(f"--train-subset must be at least one batch ({BATCH})")
    if args.out is None:
        same = args.work.resolve() == DEFAULT_WORK.resolve()
        args.out = DEFAULT_OUT if same else args.work / "study_cifar_subset"
    return args


def the_command(argv) -> str:
    prog = "python -m bench.study_cifar_subset" if __spec__ is not None else f"python {sys.argv[0]}"
    return f"{prog} {shlex.join(argv)}".strip()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.readme:
        check_readme(args.readme)  # fail now, not after hours of training
    work = args.work
    show_messages(__name__, "bench", write=tqdm.write)  # above the progress bar, as print would not

    if args.from_json:
        report = read_json(args.from_json)
        if report is None:
            raise SystemExit(f"--from-json: {args.from_json} does not exist")
        print(write_outputs(report, args.out, args.readme, json=False))
        print(f"\nwrote {args.out}.{{md,png}}" + (f" and {args.readme}" if args.readme else ""))
        return
    if args.report_only:
        study = read_json(work / "study.json")
        if study is None:
            raise SystemExit(f"--report-only: no study in {work} (no study.json)")
        body = write_outputs(build_report(work, study), args.out, args.readme)
        print(body)
        print(f"\nwrote {args.out}.{{json,md,png}}" + (f" and {args.readme}" if args.readme else ""))
        return

    stored = read_json(work / "study.json")
    if args.data.is_file():
        data_sha = sha256_of(args.data)
    elif stored is not None and (work / "data" / TAR_TOP / "train").is_dir():
        data_sha = stored["spec"]["data_sha256"]  # the tar is gone but this study extracted it already
    else:
        raise SystemExit(f"no data at {args.data} (pass --data PATH/TO/cifar10-subset.tar)")
    spec = make_spec(args, data_sha)
    work.mkdir(parents=True, exist_ok=True)
    study = open_study(work, spec, args.seeds, the_command(argv))
    session = study["sessions"][-1]
    session_watch = Stopwatch()

    def save_session(finished=False):
        session["seconds"] = session_watch.elapsed()
        session["finished"] = finished
        write_json(work / "study.json", study)

    full = extract_once(args.data, work / "data")
    data_dir = balanced_tree(full, work / "data", args.train_subset, args.test_subset)
    _, test_set, _ = build_datasets("imagefolder", data_dir)
    test_loader = DataLoader(test_set, batch_size=EVAL_BATCH, shuffle=False)

    plan = [(run_name(method, mask, seed), method, mask, seed) for seed in args.seeds for _, method, mask in METHODS]
    try:
        for name, method, mask, seed in tqdm(plan, desc="study runs", unit="run"):
            # saved after each epoch the trainer logs: a killed session loses at most one epoch of time
            _, evaluated = run_one(name, method, mask, seed, spec, work, data_dir, test_loader, args.device,
                                   on_train=lambda n=name: session["trained"].append(n), on_epoch=save_session)
            if evaluated:
                session["evaluated"].append(name)
            save_session()
    except KeyboardInterrupt:
        save_session()
        raise SystemExit("interrupted: rerun the same command to continue where it stopped")
    save_session(finished=True)
    body = write_outputs(build_report(work, study), args.out, args.readme)
    print(body)
    print(f"\nwrote {args.out}.{{json,md,png}}" + (f" and {args.readme}" if args.readme else "")
          + f"; checkpoints and data are under {work} (do not commit them)")


if __name__ == "__main__":
    main()
