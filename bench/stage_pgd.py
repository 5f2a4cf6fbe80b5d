"""Part 2 of the stage benchmark (bench/stage_report.py): PGD (eps 8/255, step 2/255, start at x, so the
runs do identical work) with the fused update, the same loop with the release's eager update and torchattacks'
PGD, in interleaved rounds; the update phase alone; and how far the implementations' results part.
"""
from __future__ import annotations

import logging
import statistics

import torch
from torch import nn

from bench.common import Runs, kernels_per_call
from bench.stage_setup import ALPHA, CPU, EPS, Session
from part_fast import ops, reference
from part_fast.attacks import PGD
from part_fast.release import release_update_pgd

logger = logging.getLogger(__name__)


def torchattacks_update(adv, grad, images, eps, alpha):
    """torchattacks 3.5.1 PGD.forward's update, verbatim."""
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=0, max=1).detach()


def eps_label(eps_form: str) -> str:
    return "(B,3,H,W) budget map" if eps_form == "map" else "scalar 8/255"


def attack_loops(model: nn.Module, x, y, ours_map, torchattacks, steps: int) -> tuple[PGD, object, list]:
    """(our PGD, torchattacks' or None, the loops compared as (name, eps form, run)), `steps` steps each."""
    attack = PGD(model, eps=EPS, alpha=ALPHA, steps=steps, start=None)
    ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False) if torchattacks else None
    loops = [
        ("part_fast PGD (fused pgd_step_)", "map", lambda: attack(x, y, eps_map=ours_map)),
        ("same loop, release eager update", "map", lambda: release_update_pgd(attack, x, y, ours_map)),
        ("part_fast PGD (fused pgd_step_)", "scalar", lambda: attack(x, y)),
        ("same loop, release eager update", "scalar", lambda: release_update_pgd(attack, x, y, None)),
    ]
    if ta is not None:
        loops.append(("torchattacks 3.5.1 PGD", "scalar", lambda: ta(x, y)))
    return attack, ta, loops


def warm_up_attacks(attack: PGD, ta, x, y, ours_map) -> None:
    """One step of each loop: the allocator and oneDNN's primitives for the batch's forward/backward."""
    steps = attack.steps
    attack.steps = 1
    release_update_pgd(attack, x, y, ours_map)
    attack(x, y, eps_map=ours_map)
    attack.steps = steps
    if ta is not None:
        ta.steps = 1
        ta(x, y)
        ta.steps = steps


def time_attacks(session: Session, loops: list) -> tuple[list[Runs], dict]:
    """(runs per loop, each loop's last adversarial batch) from interleaved rounds, then extra runs of
    the loops whose quickest run was disturbed, while the time budget lasts."""
    args = session.args
    runs = [Runs(count_faults=True) for _ in loops]
    outputs = {}

    def timed_round(indices, label):
        session.quiet()
        for i in indices:
            outputs[i] = runs[i].time(loops[i][2])
            logger.info("pgd %s %s: %.2fs, others %.2f cores", label, loops[i][:2], runs[i].seconds[-1], runs[i].others[-1])

    for r in range(args.pgd_reps):  # the order rotates from round to round: no loop always runs first
        timed_round([(i + r) % len(loops) for i in range(len(loops))], f"round {r}")
    while True:
        noisy = [i for i, loop_runs in enumerate(runs) if loop_runs.others[loop_runs.best()] > args.noisy_cores]
        per_run = statistics.median(s for loop_runs in runs for s in loop_runs.seconds)
        if not noisy or session.elapsed() + per_run * len(noisy) + 30 > args.time_budget:
            break
        timed_round(noisy, "extra")
    return runs, outputs


def attack_rows(loops: list, runs: list[Runs], batch: int) -> list[dict]:
    rows = []
    for (name, eps_form, _), loop_runs in zip(loops, runs):
        s = loop_runs.summary()
        rows.append({"impl": name, "eps": eps_label(eps_form), **s, "images_per_s": batch / s["min_s"],
                     "images_per_s_median": batch / s["median_s"]})
    return rows


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": (a - b).abs().max().item(), "elements_differing": int((a != b).sum()),
            "images_differing": int((a != b).flatten(1).any(1).sum())}


def one_update_checks(x_it, g_it, x, ours_map) -> dict:
    """One update from the SAME iterate and gradient: the implementations agree to float32 rounding (the
    release computes x_nat + clamp(x - x_nat), the fused op clamp(x, x_nat - eps, x_nat + eps))."""
    one = {}
    for name, eps in (("map", ours_map), ("scalar", EPS)):
        fused_one = ops.pgd_step_(x_it.clone(), g_it, x, eps, ALPHA)
        ref_one = reference.pgd_step_(x_it.clone(), g_it, x, eps, ALPHA)
        one[f"fused_vs_release_update_{name}"] = diff(fused_one, reference.pgd_step_release(x_it, g_it, x, eps, ALPHA))
        one[f"fused_vs_reference_backend_{name}"] = diff(fused_one, ref_one)
        if name == "scalar":
            one["fused_vs_torchattacks_update_scalar"] = diff(fused_one, torchattacks_update(x_it, g_it, x, EPS, ALPHA))
    return one


def end_to_end_checks(outputs: dict, x, ours_map, has_torchattacks: bool) -> dict:
    """Whole runs: over ten steps the 1-ulp differences of one update flip the sign of a few near-zero
    gradient elements and the trajectories part (PGD is chaotic at that scale); these figures measure
    that, not an error."""
    x_fused_map, x_rel_map, x_fused_s, x_rel_s = (outputs[i] for i in range(4))
    e2e = {
        "fused_vs_release_update_map": diff(x_fused_map, x_rel_map),
        "fused_vs_release_update_scalar": diff(x_fused_s, x_rel_s),
        "fused_map_within_budget": bool(((x_fused_map - x).abs() <= ours_map + 1e-6).all()),
    }
    if has_torchattacks:
        e2e["release_update_vs_torchattacks_scalar"] = diff(x_rel_s, outputs[4])
        e2e["fused_vs_torchattacks_scalar"] = diff(x_fused_s, outputs[4])
    return e2e


def update_phase_loops(x, x_mid, grad, ours_map, steps: int) -> list:
    """`steps` update calls on a real gradient at a real iterate, per implementation, each from a clone of
    the iterate; the clone alone comes first, to be subtracted."""
    x_nat = x.clone()

    def fused(eps):
        def fn():
            xa = x_mid.clone()
            for _ in range(steps):
                ops.pgd_step_(xa, grad, x_nat, eps, ALPHA)
        return fn

    def eager(eps, update):
        def fn():
            xa = x_mid.clone()
            for _ in range(steps):
                xa = update(xa, grad, x_nat, eps, ALPHA)
        return fn

    return [
        ("x.clone() (subtracted from the rows below)", "—", x_mid.clone),
        ("fused pgd_step_ (cpu backend)", "map", fused(ours_map)),
        ("release eager chain", "map", eager(ours_map, reference.pgd_step_release)),
        ("fused pgd_step_ (cpu backend)", "scalar", fused(EPS)),
        ("release eager chain", "scalar", eager(EPS, reference.pgd_step_release)),
        ("torchattacks eager update", "scalar", eager(EPS, torchattacks_update)),
    ]


def time_update_phase(session: Session, loops: list) -> tuple[list[dict], float]:
    """(a row per implementation, the clone's seconds): interleaved rounds of time_blocks, the clone
    subtracted from every row."""
    runs = [Runs() for _ in loops]
    for _ in range(session.args.update_rounds):
        session.quiet()
        for (_, _, fn), loop_runs in zip(loops, runs):
            loop_runs.time_blocks(fn, CPU, 0.3)
    clone_s = runs[0].summary()["min_s"]
    rows = []
    for (name, eps_form, fn), loop_runs in zip(loops[1:], runs[1:]):
        s = loop_runs.summary()
        rows.append({"impl": name, "eps": eps_label(eps_form), "ten_calls_s": s["min_s"] - clone_s,
                     "raw_min_s": s["min_s"], "round_s": s["runs_s"], "others_cores_best": s["others_cores_best"],
                     "aten_ops_10_calls": len(kernels_per_call(fn, CPU)) - 1})  # minus the clone
    for row in rows:
        fused_row = next(r for r in rows if r["eps"] == row["eps"] and r["impl"].startswith("fused"))
        row["slower_than_fused"] = row["ten_calls_s"] / fused_row["ten_calls_s"]
    return rows, clone_s


def add_update_shares(attacks: list[dict], update_rows: list[dict]) -> None:
    """Each attack's share spent in its update, from the isolated update-phase timings."""
    for row in attacks:
        kind = "fused" if "fused" in row["impl"] else ("torchattacks" if "torchattacks" in row["impl"] else "release")
        urow = next(u for u in update_rows if u["eps"] == row["eps"] and u["impl"].startswith(kind))
        row["update_s"] = urow["ten_calls_s"]
        row["update_share_pct"] = 100 * urow["ten_calls_s"] / row["min_s"]


def add_derived_times(pgd: dict) -> None:
    """Whole runs of one attack vary by a few % on a quiet machine while the update is < 0.5 % of a run:
    "derived" = the model's part (the same in every loop) + each loop's own update time says what the
    update alone changes."""
    rows = pgd["attacks"]
    spreads = [max(r["runs_s"]) / min(r["runs_s"]) - 1 for r in rows]
    pgd["run_spread_pct_median"] = 100 * statistics.median(spreads)
    common = statistics.median(r["min_s"] - r["update_s"] for r in rows)
    pgd["model_part_s"] = common
    for r in rows:
        r["derived_s"] = common + r["update_s"]


def measure_pgd(session: Session, model: nn.Module, x, y, ours_map, torchattacks) -> tuple[dict, dict, dict]:
    """(the PGD figures, the one-update checks, the end-to-end checks)."""
    attack, ta, loops = attack_loops(model, x, y, ours_map, torchattacks, session.steps)
    warm_up_attacks(attack, ta, x, y, ours_map)
    runs, outputs = time_attacks(session, loops)
    pgd = {"attacks": attack_rows(loops, runs, session.batch)}
    g_it = attack._input_gradient(outputs[0], y, None)
    one = one_update_checks(outputs[0], g_it, x, ours_map)
    e2e = end_to_end_checks(outputs, x, ours_map, ta is not None)
    update_rows, clone_s = time_update_phase(session, update_phase_loops(x, outputs[0].clone(), g_it, ours_map,
                                                                         session.steps))
    add_update_shares(pgd["attacks"], update_rows)
    pgd["update_phase"] = update_rows
    pgd["clone_s"] = clone_s
    add_derived_times(pgd)
    return pgd, one, e2e
