"""Benchmark section 3: the wall time of ONE optimiser step, AT / PART / PART (release) / TRADES / PART-T.

    python -m bench.train_step --quick            # cnn-small, batch 16, PGD-2, 1 rep: seconds
    python -m bench.train_step --out step.json    # ResNet-18, batch 64, PGD-10, 3 reps: several minutes

All configurations run in one process on the same batch and start every timed step from the same weights
(one initial model copied into each configuration; BatchNorm buffers and SGD momentum restored before each
step), so the steps do identical work and differ only in what the method adds:

| row            | what one step is                                                                         |
|----------------|------------------------------------------------------------------------------------------|
| AT             | `train_step`, method "at": PGD-k CE (uniform start), train-mode CE + SGD                 |
| PART (ours)    | `train_step`, method "part", PART phase: `PixelBudget.with_logits` (one batched eval     |
|                | forward + head-only gradient + fused `cam_eps_map`), PGD-k with the eps map (`pgd_step_`)|
| PART (release) | the released code's cost: per-image mask (forward + full backward with hooks, PIL         |
|                | bicubic, matplotlib jet, numpy z-score, `.to(device)`: `part_fast.release`'s emulation),       |
|                | amortised per step = per-image cost x batch; PGD-k with the release's global-eps         |
|                | unclipped start and eager update chain (`reference.pgd_step_release`); the same outer step|
| TRADES         | `train_step`, method "trades": KL attack with its own clean eval forward, outer          |
|                | CE(f(x_nat)) + beta KL(f(x_adv) || f(x_nat)) in train mode                                |
| PART-T (ours)  | `train_step`, method "part-trades", PART phase: the CAM forward's logits are TRADES' KL  |
|                | target (`clean_logits=`), so the budget replaces the attack's clean forward              |
| PART + EMA     | PART (ours) with `--ema-decay 0.995`: the weight average's update after the SGD step    |
| PART + AWP     | PART (ours) with `--awp-gamma 5e-3`: the proxy's train forward + backward (column awp)   |
| PART + EMA + AWP | both                                                                                   |

Two yardsticks are timed in the same rounds: an eval-mode forward (no grad) and a train-mode
forward + CE + full backward of the batch. Figures are reported, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    DEFAULT_DATA,
    Runs,
    Stopwatch,
    keep_freed_memory,
    load_average,
    load_cifar_subset,
    machine_info,
    show_messages,
    write_json,
)
from bench.step_cases import CPU, SEED, Case
from part_fast.models import CAM_LAYERS, get_model
from part_fast.modes import eval_mode
from part_fast.release import release_eps_map

THREADS = 2
FULL = {"arch": "resnet18", "batch": 64, "steps": 10, "reps": 3}
QUICK = {"arch": "cnn-small", "batch": 16, "steps": 2, "reps": 1}
# (row name, TrainConfig method, PART phase, more TrainConfig settings); "release" is built here from the
# "part" state's pieces.
CONFIGS = (
    ("AT", "at", False, {}),
    ("PART (ours)", "part", True, {}),
    ("PART (release)", "release", True, {}),
    ("TRADES", "trades", False, {}),
    ("PART-T (ours)", "part-trades", True, {}),
    ("PART + EMA", "part", True, {"ema_decay": 0.995}),
    ("PART + AWP", "part", True, {"awp_gamma": 5e-3}),
    ("PART + EMA + AWP", "part", True, {"ema_decay": 0.995, "awp_gamma": 5e-3}),
)
YARDSTICKS = ("forward (eval, no grad)", "forward + backward (train, full)")
logger = logging.getLogger(__name__)
BASE_OF = {"AT": "AT", "PART (ours)": "AT", "PART (release)": "AT", "TRADES": "TRADES", "PART-T (ours)": "TRADES",
           "PART + EMA": "PART (ours)", "PART + AWP": "PART (ours)", "PART + EMA + AWP": "PART (ours)"}


# ------------------------------------------------------------------------------------------------ data
def load_batch(batch: int, data: str = DEFAULT_DATA):
    """(x, y, description): `batch` CIFAR-10 training images (bench.common's loader: classes round-robin)
    when the subset tar exists, else seeded uniform random images."""
    if data and os.path.isfile(data):
        x, y = load_cifar_subset(data, "train", batch)
        return x, y, f"CIFAR-10 subset ({os.path.basename(data)}): {batch} train images"
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    return x, y, f"random uniform images ({data!r} not found)"


class Yardstick:
    """A model-work unit timed in the same rounds: eval forward, or train forward + CE + full backward."""

    def __init__(self, name: str, model: nn.Module):
        self.name, self.model, self.timed = name, model, Runs()

    def _work(self, x, y):
        if self.name.startswith("forward + backward"):
            self.model.train()
            F.cross_entropy(self.model(x), y).backward()
        else:
            with eval_mode(self.model), torch.no_grad():
                self.model(x)

    def step(self, x, y, timed: bool = True):
        for p in self.model.parameters():
            p.grad = None
        if timed:
            self.timed.time(lambda: self._work(x, y))
        else:
            self._work(x, y)

    def summary(self) -> dict:
        runs = self.timed.summary()
        return {"name": self.name, **{k: runs[k] for k in ("min_s", "median_s", "runs_s", "others_cores_runs")}}


# --------------------------------------------------------------------------------------------- the run
def run(quick: bool = False, *, reps: int | None = None, data: str = DEFAULT_DATA, keep_freed: bool = True,
        threads: int = THREADS) -> dict:
    """Measure the section: {"config": {...}, "rows": [...], "targets": [...], "yardsticks": [...], "why": {...}},
    JSON-able (markdown() renders it).

    quick: cnn-small, batch 16, PGD-2, 1 rep (well under a minute); else ResNet-18, batch 64, PGD-10,
    3 reps (several minutes on 2 cores). reps overrides the rep count. keep_freed: glibc malloc keeps freed
    memory (no mmap / trim: see bench.common.keep_freed_memory), as the stage report runs by default.
    threads: torch.set_num_threads while it measures (the harness passes its --threads)."""
    size = dict(QUICK if quick else FULL)
    if reps is not None:
        size["reps"] = int(reps)
    arch, batch, steps, n_reps = size["arch"], size["batch"], size["steps"], size["reps"]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        malloc = ("glibc: no mmap, no trim (freed memory kept)" if keep_freed and keep_freed_memory()
                  else "system default")
        watch = Stopwatch()
        machine = machine_info(CPU)
        machine["malloc"] = malloc
        x, y, data_desc = load_batch(batch, data)
        torch.manual_seed(SEED)
        base = get_model(arch)
        init = base.state_dict()
        logger.info("train_step bench: %s, batch %d, PGD-%d, %d rep(s), %s", arch, batch, steps, n_reps, data_desc)

        cases = [Case(name, method, phase, arch, batch, steps, init, options=options)
                 for name, method, phase, options in CONFIGS]
        for c in cases:  # same initial weights everywhere
            if not all(torch.equal(a, b) for a, b in zip(c.state.model.state_dict().values(), init.values())):
                raise RuntimeError(f"{c.name}: the initial weights were not loaded")
        yards = [Yardstick(name, copy.deepcopy(base)) for name in YARDSTICKS]

        # warm-up: one step each (allocator, oneDNN primitives); the release's per-image path on a few images
        for c in cases:
            if c.release:
                with eval_mode(c.state.model), np.errstate(invalid="ignore", divide="ignore"):
                    release_eps_map(c.cam_model, x[:4])
                mask, _ = c.release_mask(x)  # a full mask once: the warm-up step attacks with it
                c.restore()
                c.release_step(x, y, mask, 0.0)
            else:
                c.step(x, y, timed=False)
            c.take_snapshot()  # steady state: momentum buffers exist; every timed step starts here
            logger.info("  warm-up %s: done", c.name)
        for yd in yards:
            yd.step(x, y, timed=False)

        entries = [*cases, *yards]
        for r in range(n_reps):  # interleaved rounds, order rotated: no case always runs first
            order = [entries[(i + r) % len(entries)] for i in range(len(entries))]
            for e in order:
                e.step(x, y)
            logger.info("  round %d/%d: %s", r + 1, n_reps, ", ".join(f"{e.name} {e.timed.seconds[-1]:.3f}s" for e in entries))

        rows = [c.summary(batch) for c in cases]
        by = {row["name"]: row for row in rows}
        for row in rows:
            b = by[BASE_OF[row["name"]]]
            row["vs_base"] = row["min_s"] / b["min_s"]
            row["vs_base_median"] = row["median_s"] / b["median_s"]
            row["base"] = b["name"]
        yard_rows = [yd.summary() for yd in yards]
        targets = _targets(by, quick)
        config = {"quick": quick, "arch": arch, "batch": batch, "steps": steps, "reps": n_reps,
                  "eps": 8 / 255, "eps_low": 7 / 255, "step_size": 2 / 255, "beta": 6.0, "mask": "jet",
                  "cam": "gradcam", "cam_layer": CAM_LAYERS.get(arch), "threads": threads, "data": data_desc,
                  "seed": SEED, "timing": "warm-up step, then `reps` interleaved rounds (order rotated); every step "
                  "starts from the same post-warm-up snapshot; quickest and median reported",
                  "machine": {**machine, "load_average_after": load_average()},
                  "wall_seconds": watch.elapsed()}
        result = {"config": config, "rows": rows, "targets": targets, "yardsticks": yard_rows}
        result["why"] = _why(by, yard_rows, steps)
        return result
    finally:
        torch.set_num_threads(threads_before)


def _targets(by: dict, quick: bool) -> list[dict]:
    def ratio(name, a, b, goal):
        value, med = by[a]["min_s"] / by[b]["min_s"], by[a]["median_s"] / by[b]["median_s"]
        return {"target": name, "value": value, "value_median": med, "op": "<=" if goal else None, "goal": goal,
                "met": (value <= goal) if goal else None, "quick": quick}

    return [ratio("PART (ours) / AT", "PART (ours)", "AT", 1.05),
            ratio("PART-T (ours) / TRADES", "PART-T (ours)", "TRADES", 1.02),
            ratio("PART (release) / PART (ours)", "PART (release)", "PART (ours)", None)]


def _why(by: dict, yard_rows: list, steps: int) -> dict:
    """The figures of the markdown's "why" paragraph, from each row's quickest rep (as the table)."""
    part, at, rel = by["PART (ours)"], by["AT"], by["PART (release)"]
    pt, tr = by["PART-T (ours)"], by["TRADES"]
    fwd, fb = (y["min_s"] for y in yard_rows)
    budget = part["seconds"]["budget"]
    return {
        "budget_s": budget,
        "budget_share_of_part_step": budget / part["min_s"],
        "budget_over_eval_forward": budget / fwd,
        "predicted_extra_fraction": 1 / (3 * (steps + 1)),
        "measured_extra_part_vs_at": part["min_s"] / at["min_s"] - 1,
        "measured_extra_part_vs_at_median": part["median_s"] / at["median_s"] - 1,
        "partt_budget_s": pt["seconds"]["budget"],
        "trades_attack_minus_partt_attack_s": tr["seconds"]["attack"] - pt["seconds"]["attack"],
        "measured_extra_partt_vs_trades": pt["min_s"] / tr["min_s"] - 1,
        "at_over_forward_backward": at["min_s"] / fb,
        "forward_backward_over_forward": fb / fwd,
        "release_mask_s": rel["seconds"]["budget"],
        "release_mask_share_of_step": rel["seconds"]["budget"] / rel["min_s"],
        "release_attack_minus_ours_s": rel["seconds"]["attack"] - part["seconds"]["attack"],
        # The recipe's additions, over PART (ours); absent from runs saved before they were measured.
        **({"ema_extra": by["PART + EMA"]["min_s"] / part["min_s"] - 1,
            "awp_extra": by["PART + AWP"]["min_s"] / part["min_s"] - 1,
            "awp_s": by["PART + AWP"]["seconds"]["awp"],
            "ema_awp_extra": by["PART + EMA + AWP"]["min_s"] / part["min_s"] - 1,
            "predicted_awp_extra": 1 / (steps + 1)} if "PART + AWP" in by else {}),
    }


NOISY_CORES = 0.25  # a timed step during which other processes used more CPU than this is flagged


def _noise(res: dict) -> dict:
    runs = [(v, o) for r in res["rows"] for v, o in zip(r["runs_s"], r["others_cores_runs"])]
    quiet_spread = []
    for r in res["rows"]:
        quiet = [v for v, o in zip(r["runs_s"], r["others_cores_runs"]) if o <= NOISY_CORES]
        if len(quiet) > 1:
            quiet_spread.append(max(quiet) / min(quiet) - 1)
    return {"steps": len(runs), "noisy_steps": sum(o > NOISY_CORES for _, o in runs),
            "quiet_spread_max": max(quiet_spread) if quiet_spread else None,
            "quickest_noisy": [r["name"] for r in res["rows"] if r["others_cores_best"] > NOISY_CORES]}


# ------------------------------------------------------------------------------------------ markdown
def markdown(res: dict) -> str:
    """The section's tables and its "why" paragraph, rendered from run()'s result (or a saved run's): the
    paragraph's figures are recomputed from the rows, as run() computed them."""
    c, m = res["config"], res["config"]["machine"]
    w = _why({r["name"]: r for r in res["rows"]}, res["yardsticks"], c["steps"])
    b, k = c["batch"], c["steps"]
    quick = " **(quick mode: not the reference size)**" if c["quick"] else ""
    lines = [
        f"### One training step: {c['arch']}, batch {b}, PGD-{k}, eps 8/255, step 2/255{quick}",
        "",
        (f"{m['date']}, {m['cpu']}, {c['threads']} threads, torch {m['torch']}, {m['malloc']}; {c['data']}; "
         f"load average {m['load_average_before'][0]:.2f} → {m['load_average_after'][0]:.2f}. Warm-up step, then "
         f"{c['reps']} interleaved round(s); every step starts from the same weights, BatchNorm buffers and momentum. "
         "Split columns: the quickest rep's `StepResult.seconds` (release: its own step, budget = the per-image mask "
         f"of all {b} images, i.e. per-image cost × batch, measured once per rep)."),
        "",
        "| configuration | s / step | median s | images/s | data | budget | attack | awp | update | × base | others (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        s = r["seconds"]
        lines.append(f"| {r['name']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['images_per_s']:.1f} | "
                     f"{s['data']:.4f} | {s['budget']:.3f} | {s['attack']:.3f} | {s.get('awp', 0.0):.3f} | {s['update']:.3f} | "
                     f"{r['vs_base']:.3f} ({r['base']}) | {r['others_cores_best']:.2f} |")
    yards, nz = res["yardsticks"], _noise(res)
    note = (f"Noise: {nz['noisy_steps']} of {nz['steps']} timed steps ran while other processes used > {NOISY_CORES} "
            "cores (the median column includes them; the quickest column does not"
            + (f", except {', '.join(nz['quickest_noisy'])}" if nz["quickest_noisy"] else "") + ")")
    if nz["quiet_spread_max"] is not None:
        note += f"; the quiet steps of one row still differed by up to {100 * nz['quiet_spread_max']:.0f}% (max/min − 1)"
    lines += ["", note + ".", "", "Yardsticks (same rounds): " + "; ".join(f"{y['name']} {y['min_s']:.3f} s (median {y['median_s']:.3f})"
                                                                           for y in yards) + ".",
              "", "| target | quickest | median | goal | met |", "|---|---:|---:|---:|---|"]
    for t in res["targets"]:
        goal = f"≤ {t['goal']:g}" if t["goal"] else "—"
        met = "—" if t["met"] is None else ("yes" if t["met"] else "NO")
        if t["quick"] and t["met"] is not None:
            met += " (quick)"
        lines.append(f"| {t['target']} | {t['value']:.3f} | {t['value_median']:.3f} | {goal} | {met} |")
    lines += [
        "",
        f"**Why.** PART's budget (one batched eval forward, a gradient through the head only, one fused "
        f"`cam_eps_map`) took {w['budget_s']:.3f} s, {100 * w['budget_share_of_part_step']:.1f}% of the PART step "
        f"({w['budget_over_eval_forward']:.2f}× an eval forward of the batch). A step's model work is {k + 1} "
        f"forward+backward passes ({k} attack steps + the outer step; measured AT step = "
        f"{w['at_over_forward_backward']:.1f}× one train forward+backward"
        + (f", below {k + 1} because the attack's backward computes input gradients only"
           if w["at_over_forward_backward"] < k + 1 else "")
        + "), and a forward is about a third of a forward+backward "
        f"(measured {1 / w['forward_backward_over_forward']:.2f}), so the budget should add ≈ 1/(3·({k}+1)) = "
        f"{100 * w['predicted_extra_fraction']:.1f}%; measured PART / AT − 1 = {100 * w['measured_extra_part_vs_at']:+.1f}% "
        f"(median {100 * w['measured_extra_part_vs_at_median']:+.1f}%). PART-T reuses the CAM forward's logits as "
        f"TRADES' KL target, so its budget ({w['partt_budget_s']:.3f} s) replaces the attack's own clean forward "
        f"(TRADES attack − PART-T attack = {w['trades_attack_minus_partt_attack_s']:+.3f} s) and only the head gradient "
        f"+ `cam_eps_map` remain: PART-T / TRADES − 1 = {100 * w['measured_extra_partt_vs_trades']:+.1f}%. The release's "
        f"per-image mask costs {w['release_mask_s']:.3f} s per step ({100 * w['release_mask_share_of_step']:.0f}% of its "
        f"step: {b} batch-1 forwards and full backwards plus PIL / matplotlib / numpy per image), and its eager update "
        f"changes the attack by {w['release_attack_minus_ours_s']:+.3f} s."
        + (f" The recipe's additions: the weight average's update (`--ema-decay`) adds "
           f"{100 * w['ema_extra']:+.1f}% to the PART step; AWP (`--awp-gamma`) adds one train forward + backward of "
           f"the proxy ({w['awp_s']:.3f} s, column awp) to the {k + 1} of the step, ≈ 1/({k}+1) = "
           f"{100 * w['predicted_awp_extra']:.0f}% predicted, {100 * w['awp_extra']:+.1f}% measured; both "
           f"{100 * w['ema_awp_extra']:+.1f}%." if "awp_extra" in w else ""),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cnn-small, batch 16, PGD-2, 1 rep (seconds)")
    parser.add_argument("--out", default=None, metavar="JSON", help="also write the result as JSON")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default: 1 quick, 3 full)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="cifar10-subset.tar (random images when absent)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch.set_num_threads (default {THREADS})")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--verbose", action="store_true", help="progress lines on stderr")
    parser.add_argument("--render", metavar="JSON", help="print the markdown of a previous run's JSON and exit")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return
    if args.verbose:
        show_messages(__name__, "bench")
    res = run(args.quick, reps=args.reps, data=args.data, keep_freed=not args.system_malloc, threads=args.threads)
    res["markdown"] = markdown(res)  # kept in the JSON for its readers; never read back
    print(res["markdown"])
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
