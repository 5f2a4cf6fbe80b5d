"""`part-fast demo`: AT vs PART on the built-in `shapes` data with a small CNN, in minutes on a CPU (on the GPU
when there is one, or where `device` says).

Because `shapes` knows which pixels belong to the object, the demo also reports where PART puts the full
eps: the share of full-eps (pixel, channel) elements that fall on the object, next to the object's share
of the image (what a budget blind to the object would get).

Its table gives each method's median epoch time, and a note names any epoch over twice the median with
the CPU other processes used meanwhile: on a shared CPU, torch's threads wait for each other at every
operation, so an epoch that shares the cores with another process can take ten times as long (on 2 cores
with other processes busy: AT epochs of 111 s against a median of 6.6 s), which is no property of the
method."""
from __future__ import annotations

import json
import logging
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import cpu_load
from . import data as data_mod
from .cpu_load import busy_elsewhere
from .budget import PixelBudget
from .devices import describe_device, resolve_device
from .evaluation import evaluate
from .models import CAM_LAYERS
from .files import atomic_write_text
from .logs import watching
from .train import TrainConfig, load_model, train
from .train import loop as train_loop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sized to finish in a few minutes on 2 CPU cores. eps = 4/255 (at 8/255 a small CNN trained from scratch
    on 3000 images stays at chance for longer than the demo lasts) and eps_low = 2/255, a wider gap than the
    paper's 8/255 vs 7/255 so that a short run shows the difference; the LR drops 10x for the last 2 epochs."""

    train_size: int = 3000
    test_size: int = 500
    epochs: int = 10
    warmup: int = 3
    batch_size: int = 32
    lr: float = 0.05
    steps: int = 3
    step_size: float = 1.5 / 255
    eps: float = 4 / 255
    eps_low: float = 2 / 255
    seed: int = 0


def budget_on_object(model, images: torch.Tensor, masks: torch.Tensor, budget: PixelBudget) -> dict:
    """Where the full eps goes: share of full-eps elements on the object vs the object's share of pixels."""
    eps_map = budget(model, images).cpu()  # (B, C, H, W)
    high = (eps_map == torch.tensor(budget.eps, dtype=torch.float32)).float()
    on_object = masks[:, None].float().expand_as(high)
    full = float(high.sum())
    return {
        "full_eps_on_object": float((high * on_object).sum()) / full if full else float("nan"),
        "object_share_of_pixels": float(masks.float().mean()),
        "full_eps_share": float(high.mean()),
    }


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), *, progress: bool | None = None,
             device: str | torch.device = "auto") -> dict:
    """Train AT and PART on `shapes` with a small CNN, evaluate both, and write OUT/{at,part}/ (their run
    directories), OUT/summary.{json,md} and OUT/budget_maps.png. Logs its steps, the trainer's lines (indented)
    and the table at INFO (part_fast.logs).

    Args:
        out: a new or empty directory.
        settings: the sizes and budgets (the defaults finish in minutes on 2 CPU cores).
        progress: progress bars (None: when stderr is a terminal).
        device: "auto", "cpu", "cuda" or a torch.device.

    Returns:
        summary.json's dict: per method the accuracies, epoch times and where the time went; PART's budget
        on the object; the settings and the PNG's path.
    """
    device = resolve_device(device)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"demo output directory {out} exists and is not empty; pass another --out")
    logger.info(f"demo: device {describe_device(device)}")
    if device.type == "cpu":
        busy = busy_elsewhere()
        if busy is not None and busy >= BUSY_CORES:
            logger.info(f"demo: other processes are using {busy:.1f} of the {os.cpu_count()} cores; the epochs will be slow "
                        f"while they do ({_SHARED_CORES_ADVICE})")
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    _, test_set, _ = data_mod.build_datasets("shapes", train_subset=s.train_size, test_subset=s.test_size, seed=s.seed)
    test_loader = DataLoader(test_set, batch_size=250)
    results = {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    for method in ("at", "part"):
        config = TrainConfig(out=str(out / method), dataset="shapes", arch="cnn-small", method=method, epochs=s.epochs,
                             warmup=s.warmup, lr=s.lr, milestones=(max(s.epochs - s.warmup - 1, 1),),
                             batch_size=s.batch_size, device=str(device),
                             eps=s.eps, eps_low=s.eps_low, steps=s.steps, step_size=s.step_size, seed=s.seed,
                             train_subset=s.train_size, test_subset=s.test_size, eval_examples=0, progress=progress,
                             time_stages=True)  # its table splits the time by stage
        logger.info(f"demo: training {method.upper()} ({s.epochs} epochs, {s.train_size} shapes images, PGD-{s.steps})")
        load = EpochLoad()

        start = time.perf_counter()
        with watching(train_loop.__name__, load.observe, prefix="  "):
            history = train(config)
        train_seconds = time.perf_counter() - start
        model, _ = load_model(out / method / "last.pt", device)
        scores = evaluate(model, test_loader, attacks=("natural", "pgd20"), eps=s.eps, alpha=s.step_size,
                          device=device, seed=s.seed, progress=bool(progress))
        phases = ("budget", "attack", "update", "data")
        spent = {p: sum(r[f"{p}_seconds"] for r in history) for p in phases}
        total = sum(spent.values())
        epoch_seconds = [r["epoch_seconds"] for r in history]
        results[method] = {
            "natural": scores["natural"],
            "pgd20": scores["pgd20"],
            "median_epoch_seconds": statistics.median(epoch_seconds),
            "epoch_seconds": epoch_seconds,
            # Per epoch, the cores other processes kept busy meanwhile (None: not measurable here).
            "other_processes_cores": [load.other_cores.get(r["epoch"]) for r in history],
            "train_seconds": train_seconds,
            "time_share": {p: spent[p] / total for p in phases},
        }
    part_model, part_config = load_model(out / "part" / "last.pt", device)
    budget = PixelBudget(s.eps, s.eps_low, part_config.cam, part_config.mask, layer=CAM_LAYERS["cnn-small"])
    images = torch.stack([test_set[i][0] for i in range(len(test_set))]).to(device)
    masks = data_mod.object_mask_of(test_set)
    results["part"]["budget"] = budget_on_object(part_model, images, masks, budget)
    from .plots import budget_overlay_png, budget_title

    n_show = 8
    eps_maps = budget(part_model, images[:n_show])
    titles = [data_mod.SHAPE_CLASSES[test_set[i][1]] for i in range(n_show)]
    png = budget_overlay_png(out / "budget_maps.png", images[:n_show], eps_maps, s.eps, titles, masks[:n_show],
                             suptitle=budget_title("cnn-small", part_config.cam, part_config.mask, s.eps, s.eps_low))
    results["settings"] = s.__dict__
    results["png"] = str(png)
    atomic_write_text(out / "summary.json", json.dumps(results, indent=2) + "\n")
    table = summary_table(results)
    atomic_write_text(out / "summary.md", table + "\n")
    logger.info(table)
    logger.info(f"budget maps: {png}")
    return results


# ----------------------------------------------------------------------------------------- timing
# An epoch over this many times its method's median is named in a note under the table.
OUTLIER_FACTOR = 2.0
# Other processes using at least this many cores during an epoch are named as its likely cause.
BUSY_CORES = 0.5
# Why an epoch that shares the cores is slow out of proportion, and what to do: measured on 2 cores with
# 3 other busy processes, 20 demo steps took 20-30 s with torch's 2 threads and 5.5 s with 1 thread.
_SHARED_CORES_ADVICE = ("torch's threads wait for each other at every operation, so a core lost to another "
                        "process slows the demo several times over; run it on an idle machine, or with "
                        "OMP_NUM_THREADS=1 on a busy one")
# The trainer's per-epoch line ('epoch 3/10 [at] | loss ...'), logged once each epoch ends.
_EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ \[")


class EpochLoad:
    """What else ran during each epoch. `observe` sees every line the trainer logs and samples the machine's
    busy CPU time and this process's at each epoch line; between two samples, the busy time this process
    did not spend is other processes', and `other_cores[epoch]` is that over the epoch's wall time (the
    first epoch's interval includes the trainer's set-up)."""

    _sample = staticmethod(cpu_load.sample)

    def __init__(self):
        self.other_cores: dict[int, float | None] = {}
        self._last = self._sample()

    def observe(self, line: str) -> None:
        match = _EPOCH_LINE.match(line)
        if not match:
            return
        now = self._sample()
        self.other_cores[int(match.group(1))] = cpu_load.other_cores(self._last, now)
        self._last = now


def outlier_epochs(epoch_seconds: list[float], factor: float = OUTLIER_FACTOR) -> list[int]:
    """Indices of the epochs that took more than `factor` times the median epoch."""
    median = statistics.median(epoch_seconds)
    return [i for i, t in enumerate(epoch_seconds) if t > factor * median]


def timing_notes(results: dict) -> list[str]:
    """One line per epoch over OUTLIER_FACTOR x its method's median, with what the demo knows of the cause;
    one per method whose median itself comes from epochs that shared the cores with other processes."""
    notes, shared = [], False
    cores = results.get("cpu_count") or "?"
    for method in ("at", "part"):
        r = results[method]
        seconds, median = r["epoch_seconds"], r["median_epoch_seconds"]
        others = r.get("other_processes_cores") or [None] * len(seconds)
        for i in outlier_epochs(seconds):
            line = f"{method.upper()} epoch {i + 1} took {seconds[i]:.1f} s against a median of {median:.1f} s: "
            if others[i] is None:
                line += "other processes' CPU use could not be measured here."
            elif others[i] >= BUSY_CORES:
                line += f"other processes kept {others[i]:.1f} of the {cores} cores busy meanwhile."
                shared = True
            else:
                line += (f"other processes used only {others[i]:.1f} of the {cores} cores meanwhile, so the cause "
                         "is probably inside this process.")
            notes.append(line)
        busy = [i for i, c in enumerate(others) if c is not None and c >= BUSY_CORES]
        if 2 * len(busy) >= len(seconds):  # then the median epoch itself shared the cores
            notes.append(f"{method.upper()}: {len(busy)} of its {len(seconds)} epochs shared the cores with other "
                         f"processes, so its median measures the machine's load too; its fastest epoch took "
                         f"{min(seconds):.1f} s.")
            shared = True
    if shared and results.get("device", "cpu").startswith("cpu") and results.get("threads", 1) > 1:
        notes.append(f"On shared cores {_SHARED_CORES_ADVICE}.")
    if notes:
        notes.append("s / epoch is each method's median epoch; summary.json keeps every epoch's time.")
    return notes


def summary_table(results: dict) -> str:
    rows = ["| method | natural acc | PGD-20 acc | s / epoch (median) | budget | attack | update | data |",
            "|---|---|---|---|---|---|---|---|"]
    for method in ("at", "part"):
        r = results[method]
        share = r["time_share"]
        rows.append(f"| {method.upper()} | {r['natural']:.1f}% | {r['pgd20']:.1f}% | {r['median_epoch_seconds']:.1f} | "
                    f"{100 * share['budget']:.1f}% | {100 * share['attack']:.1f}% | {100 * share['update']:.1f}% | "
                    f"{100 * share['data']:.1f}% |")
    notes = timing_notes(results)
    if notes:
        rows.append("")
        rows.extend(notes)
    b = results["part"].get("budget")
    if b:
        rows.append("")
        rows.append(f"PART budget on the test images: {100 * b['full_eps_on_object']:.1f}% of the full-eps elements "
                    f"fall on the object, which covers {100 * b['object_share_of_pixels']:.1f}% of the pixels "
                    f"({100 * b['full_eps_share']:.1f}% of all elements get the full eps).")
    return "\n".join(rows)
