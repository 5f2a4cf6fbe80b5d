"""The real-data study's report (bench/study_cifar_subset.py runs the study): every run's record read back
from the work dir, the verdict rule (aggregate, compare, headline; tests/test_study_verdict.py checks it on
made-up numbers), and the rendering of a report to markdown, a PNG and the README's study block.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
from pathlib import Path

import torch

from bench import common
from bench.common import readme_text, write_readme_blocks
from part_fast.files import atomic_write_bytes, atomic_write_text

# (label, method, mask); AT ignores the mask (TrainConfig still validates one, so it keeps the default).
METHODS = (("AT", "at", None), ("PART (jet)", "part", "jet"), ("PART (cam)", "part", "cam"))
RUN_NAME = re.compile(r"^(at|part-jet|part-cam)-seed(\d+)$")
METRICS = (("natural", "natural"), ("pgd20", "PGD-20"), ("mma", "MMA"))
README_START, README_END = "<!-- study:start -->", "<!-- study:end -->"


def label_of(name: str) -> str:
    prefix = RUN_NAME.match(name).group(1)
    return {"at": "AT", "part-jet": "PART (jet)", "part-cam": "PART (cam)"}[prefix]


def is_default_study(spec: dict) -> bool:
    return (spec["epochs"], spec["warmup"], spec["train_subset"], spec["test_subset"]) == (15, 5, None, None)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj) -> None:
    """Strict: a value JSON cannot represent raises instead of being stored as its text."""
    common.write_json(path, obj, default=None)


# ------------------------------------------------------------------------------------------- the runs
def collect_runs(work: Path, spec: dict) -> list[dict]:
    """One record per run folder of the study: its training history's totals and its stored evaluation."""
    runs = []
    runs_dir = work / "runs"
    for run_dir in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        match = RUN_NAME.match(run_dir.name)
        if not match:
            continue
        metrics_path = run_dir / "metrics.jsonl"
        history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
            if metrics_path.exists() else []
        record = {"name": run_dir.name, "label": label_of(run_dir.name), "seed": int(match.group(2)),
                  "epochs_done": len(history), "complete": len(history) >= spec["epochs"],
                  "train_seconds": sum(h["epoch_seconds"] for h in history),
                  "train_seconds_split": {k: sum(h.get(f"{k}_seconds", 0.0) for h in history)
                                          for k in ("data", "budget", "attack", "update")},
                  "final_train_adv_acc": history[-1]["train_adv_acc"] if history else None,
                  "final_eps_high_fraction": history[-1]["eps_high_fraction"] if history else None}
        saved = read_json(run_dir / "study_eval.json")
        if saved is not None and saved.get("spec") == spec["eval"] and saved.get("checkpoint_epoch") == spec["epochs"]:
            record.update({"accuracy": saved["accuracy"], "eval_seconds": saved["eval_seconds"],
                           "eval_examples": saved["examples"], "attack_seconds": saved["attack_seconds"]})
        runs.append(record)
    return runs


# -------------------------------------------------------------------------------------------- verdict
def summary(values: list[float]) -> dict:
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n >= 2 else None, "values": values}


def aggregate(runs: list[dict]) -> dict:
    out = {}
    for label, _, _ in METHODS:
        mine = [r for r in runs if r["label"] == label]
        evaluated = [r for r in mine if "accuracy" in r]
        out[label] = {key: summary([r["accuracy"][key] for r in evaluated]) for key, _ in METRICS}
        out[label]["train_seconds"] = summary([r["train_seconds"] for r in mine if r["complete"]])
        out[label]["eval_seconds"] = summary([r["eval_seconds"] for r in evaluated])
    return out


# How many standard errors of the difference of the means a gap must exceed to count. A gap in means is
# judged against the SE of that gap (not against one run's spread); with 3 seeds per method, 2 SE is a
# loose two-sided 95 % bar (Welch's t with ~4 degrees of freedom would ask for ~2.8).
SE_BAR = 2.0


def compare(agg: dict, part_label: str) -> dict:
    """PART minus AT on each metric, with the pooled seed std and the standard error of the difference, and
    the verdict on the paper's claim (higher natural accuracy at equal robustness):
      shows            natural higher by more than SE_BAR standard errors, and neither PGD-20 nor MMA lower
                       by more than SE_BAR standard errors;
      does not show    natural not higher at all, or robustness lower by more than SE_BAR standard errors (a
                       move along the trade-off, not past it);
      inconclusive     otherwise: a natural gain the seeds cannot tell from noise, or fewer than 2 seeds."""
    at, part = agg["AT"], agg[part_label]
    diffs = {}
    for key, _ in METRICS:
        a, p = at[key], part[key]
        if a["n"] == 0 or p["n"] == 0:
            diffs[key] = None
            continue
        d = p["mean"] - a["mean"]
        if a["n"] >= 2 and p["n"] >= 2:
            pooled = math.sqrt((a["std"] ** 2 + p["std"] ** 2) / 2)
            se = math.sqrt(a["std"] ** 2 / a["n"] + p["std"] ** 2 / p["n"])
        else:
            pooled = se = None
        diffs[key] = {"diff": d, "seed_std": pooled, "se": se}
    if any(diffs[k] is None or diffs[k]["se"] is None for k, _ in METRICS):
        n_min = min(at["natural"]["n"], part["natural"]["n"])
        return {"diffs": diffs, "natural_higher": None, "robust_kept": None, "verdict": "inconclusive at this scale",
                "reason": f"only {n_min} evaluated seed(s) for one of the methods: no standard error to compare with"}
    nat = diffs["natural"]
    natural_higher = nat["diff"] > SE_BAR * nat["se"]
    robust_kept = all(diffs[k]["diff"] >= -SE_BAR * diffs[k]["se"] for k in ("pgd20", "mma"))
    if natural_higher and robust_kept:
        verdict, reason = "shows", f"natural accuracy higher by more than {SE_BAR:g} SE, robustness kept"
    elif nat["diff"] <= 0:
        verdict, reason = "does not show", "natural accuracy is not higher"
    elif not robust_kept:
        verdict, reason = "does not show", f"robust accuracy drops by more than {SE_BAR:g} SE (a trade-off move)"
    else:
        verdict, reason = ("inconclusive at this scale",
                           f"the natural gain is under {SE_BAR:g} SE: the seeds cannot tell it from noise")
    return {"diffs": diffs, "natural_higher": natural_higher, "robust_kept": robust_kept, "verdict": verdict,
            "reason": reason}


# ------------------------------------------------------------------------------------------ rendering
def fmt_cell(s: dict, expected: int, digits: int = 2) -> str:
    if s["n"] == 0:
        return "–"
    text = f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")
    return text + (f" (n={s['n']})" if s["n"] != expected else "")


def fmt_time(s: dict, expected: int) -> str:
    if s["n"] == 0:
        return "–"
    scale, unit = (60, "min") if s["mean"] >= 120 else (1, "s")
    text = f"{s['mean'] / scale:.1f}" + (f" ± {s['std'] / scale:.1f}" if s["std"] is not None else "") + f" {unit}"
    return text + (f" (n={s['n']})" if s["n"] != expected else "")


def fmt_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{seconds / 60:.1f} min"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def comparison_sentence(label: str, c: dict) -> str:
    d = c["diffs"]
    if any(d[k] is None for k, _ in METRICS):
        return f"{label} vs AT: not enough evaluated runs yet → **{c['verdict']}**."
    if d["natural"]["seed_std"] is None:
        parts = [f"{name} {signed(d[k]['diff'])} pts" for k, name in METRICS]
        return f"{label} − AT: {', '.join(parts)}; {c['reason']} → **{c['verdict']}**."
    parts = [f"{name} {signed(d[k]['diff'])} ± {d[k]['se']:.2f} pts (seed std {d[k]['seed_std']:.2f})"
             for k, name in METRICS]
    checks = (f"natural higher by more than {SE_BAR:g} SE: {'yes' if c['natural_higher'] else 'no'}; "
              f"PGD-20 and MMA no more than {SE_BAR:g} SE lower: {'yes' if c['robust_kept'] else 'no'}")
    return f"{label} − AT: {', '.join(parts)}. {checks} → **{c['verdict']}** ({c['reason']})."


def render_markdown(report: dict, png_link: str) -> str:
    spec, agg, expected = report["spec"], report["methods"], len(report["seeds"])
    milestones = spec["milestones"]
    low = spec["epochs"] - spec["warmup"] - milestones[0] + 1 if milestones else 0
    n_train = spec["train_subset"] or 10000
    n_test = spec["test_subset"] or 2000
    lines = []
    if not is_default_study(spec):
        lines += [("> **Not the study's settings** (a smoke or reduced run): "
                   f"{plural(spec['epochs'], 'epoch')}, warm-up {spec['warmup']}, train subset {spec['train_subset']}, "
                   f"test subset {spec['test_subset']}. Do not read these numbers as results."), ""]
    lines += [
        f"AT vs PART on real CIFAR-10 images ({n_train} train / {n_test} test, class-balanced, from "
        f"`cifar10-subset.tar`): `{spec['arch']}` (ResNet-10, width 16, GradCAM at layer4), {plural(spec['epochs'], 'epoch')} "
        f"(PART: {plural(spec['warmup'], 'AT warm-up epoch')}, then PART; AT uses the same LR schedule), SGD lr {spec['lr']} "
        f"(momentum {spec['momentum']}, wd {spec['weight_decay']:g}"
        + (f", ×0.1 for the last {plural(low, 'epoch')}" if milestones else "") + f"), batch {spec['batch_size']}, "
        f"PGD-{spec['steps']} training (step 2/255), ε 8/255, ε_low 7/255. Evaluated on all {n_test} test images: "
        f"natural, PGD-20 (step 2/255, random start), MMA (3 targets × 20 steps). Accuracy in %, mean ± sample "
        f"std over seeds {', '.join(map(str, report['seeds']))}.",
        "",
        "| method | runs | natural | PGD-20 | MMA | train time / run | eval time / run |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, _, _ in METHODS:
        a = agg[label]
        runs_done = a["natural"]["n"]
        lines.append(f"| {label} | {runs_done}/{expected} | {fmt_cell(a['natural'], expected)} | "
                     f"{fmt_cell(a['pgd20'], expected)} | {fmt_cell(a['mma'], expected)} | "
                     f"{fmt_time(a['train_seconds'], expected)} | {fmt_time(a['eval_seconds'], expected)} |")
    lines += ["", f"![natural vs PGD-20 accuracy per run]({png_link})", ""]
    lines.append(f"**Does the paper's effect (higher natural accuracy at equal robustness) show at this scale? "
                 f"{report['headline']}**")
    lines.append("")
    for label, c in report["comparisons"].items():
        lines.append(f"- {comparison_sentence(label, c)}")
    lines += ["", ("Differences are PART minus AT in accuracy points, ± the standard error (SE) of the difference "
              "of the means; the seed std is the pooled sample std of the two methods. A gap counts when it "
                   f"exceeds {SE_BAR:g} SE; with three seeds that is a loose bar, so \"shows\" would mean the gap "
                   "stands out from the seed-to-seed noise, no more."), ""]
    commands = report["commands"]
    lines.append("Command: " + (", then ".join(f"`{c}`" for c in commands) if commands else "–"))
    wall = report["wall_time"]
    lines.append(f"Wall time: {fmt_duration(wall['sessions_seconds'])} over {wall['sessions']} session(s) "
                 f"(training + evaluation of the {wall['runs']} run(s): {fmt_duration(wall['runs_seconds'])}), "
                 f"torch threads {report['machine']['torch_threads']} on {report['machine']['cpus']} CPU(s); 1-min load "
                 f"average at the start of each working session: {report['machine']['load_average_1min']} "
                 f"(the machine may have been shared: wall times are upper bounds).")
    return "\n".join(lines)


def headline(comparisons: dict) -> str:
    jet = comparisons["PART (jet)"]["verdict"]
    cam = comparisons["PART (cam)"]["verdict"]
    if jet == cam:
        text = {"shows": "It shows, with both masks.", "does not show": "It does not show, with either mask.",
                "inconclusive at this scale": "Inconclusive at this scale, with both masks."}[jet]
    else:
        phrase = {"shows": "it shows", "does not show": "it does not show", "inconclusive at this scale": "inconclusive"}
        text = f"With the released jet mask {phrase[jet]}; with the cam mask {phrase[cam]} (at this scale)."
    gaps = []
    for key, name in METRICS:
        per_mask = [(label.split("(")[1].rstrip(")"), c["diffs"].get(key)) for label, c in comparisons.items()]
        if any(d is None or d["se"] is None for _, d in per_mask):
            return text
        gaps.append(f"{name} " + ", ".join(f"{signed(d['diff'])} ± {d['se']:.2f} ({mask})" for mask, d in per_mask))
    return f"{text} PART − AT in points: {'; '.join(gaps)}."


def trade_off_png(report: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"AT": ("tab:gray", "o"), "PART (jet)": ("tab:red", "s"), "PART (cam)": ("tab:blue", "^")}
    any_points = False
    for label, _, _ in METHODS:
        color, marker = styles[label]
        runs = [r for r in report["runs"] if r["label"] == label and "accuracy" in r]
        if not runs:
            continue
        any_points = True
        xs = [r["accuracy"]["pgd20"] for r in runs]
        ys = [r["accuracy"]["natural"] for r in runs]
        ax.scatter(xs, ys, color=color, marker=marker, alpha=0.35, s=30)
        a = report["methods"][label]
        ax.errorbar(a["pgd20"]["mean"], a["natural"]["mean"], xerr=a["pgd20"]["std"], yerr=a["natural"]["std"],
                    color=color, marker=marker, markersize=9, capsize=4, linestyle="none",
                    label=f"{label} (mean ± std, n={len(runs)})")
    if any_points:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluated runs yet", ha="center", va="center", transform=ax.transAxes)
    spec = report["spec"]
    ax.set_xlabel("PGD-20 accuracy (%)")
    ax.set_ylabel("natural accuracy (%)")
    ax.set_title(f"CIFAR-10 subset, {spec['arch']}, {plural(spec['epochs'], 'epoch')}: small points = runs", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- the report
def build_report(work: Path, study: dict) -> dict:
    """The study's report from its work dir: every run's record, the methods' aggregates and verdicts, the
    sessions' commands and wall time (JSON-able: render_markdown and trade_off_png render it)."""
    spec = study["spec"]
    runs = collect_runs(work, spec)
    agg = aggregate(runs)
    comparisons = {label: compare(agg, label) for label in ("PART (jet)", "PART (cam)")}
    sessions = study["sessions"]
    commands = []
    for s in sessions:
        if (s["trained"] or s["evaluated"]) and s["command"] not in commands:
            commands.append(s["command"])
    runs_seconds = sum(r["train_seconds"] + r.get("eval_seconds", 0.0) for r in runs)
    working = [s for s in sessions if s["trained"] or s["evaluated"]] or sessions[-1:]
    return {
        "spec": spec, "seeds": study["seeds"], "runs": runs, "methods": agg, "comparisons": comparisons,
        "headline": headline(comparisons), "commands": commands,
        "wall_time": {"sessions_seconds": sum(s["seconds"] for s in sessions), "sessions": len(sessions),
                      "runs_seconds": runs_seconds, "runs": len(runs)},
        "sessions": sessions,
        "machine": {"cpus": os.cpu_count(),
                    "torch_threads": ", ".join(str(t) for t in sorted({s["torch_threads"] for s in working})) or "–",
                    "load_average_1min": ", ".join(f"{s['load_average_start'][0]:.2f}" for s in working) or "–",
                    "torch": torch.__version__},
    }


def write_outputs(report: dict, out: Path, readme: str | None, *, json: bool = True) -> str:
    """<out>.png and <out>.md rendered from the report (and <out>.json with json=True; readme: also its study
    block); returns the markdown's body."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png, md_path, json_path = out.with_suffix(".png"), out.with_suffix(".md"), out.with_suffix(".json")
    atomic_write_bytes(png, lambda f: f.write(trade_off_png(report)))
    if json:
        write_json(json_path, report)
    body = render_markdown(report, os.path.relpath(png, md_path.parent))
    atomic_write_text(md_path, "# Real-data study: AT vs PART on a CIFAR-10 subset\n\n" + body + "\n")
    if readme:
        write_readme_block(readme, render_markdown(report, os.path.relpath(png, Path(readme).resolve().parent)))
    return body


def check_readme(path: str) -> str:
    return readme_text(path, [(README_START, README_END)])


def write_readme_block(path: str, block: str) -> None:
    write_readme_blocks(path, {(README_START, README_END): block})
