"""`part-fast bench`: every benchmark section side by side in ONE process, written as JSON + markdown + PNG.

    python -m bench.run                      # full run (~15 min on 2 CPU cores): the README's figures
    python -m bench.run --quick              # every section at reduced size (< 3 min here; exercised by CI)
    python -m bench.run --readme README.md   # also regenerate the README's tables from this run's JSON
    python -m bench.run --from-json bench/results/<stem>.json --readme README.md   # re-render, measure nothing

Sections:
1. ops: pgd_step_, project_, cam_eps_map for every usable backend, the reference and the released eager
   chain, at CIFAR (128×3×32×32), TinyImageNet (128×3×64×64) and ImageNet-like (64×3×224×224) sizes, float32
   and bf16: time, GB/s and the share of the clone() bandwidth measured in the same run (bench/ops_report.py);
2. the CAM + budget stage against the release's per-image pipeline, emulated (bench/stage_report.py);
3. one training step of AT, PART (ours), PART as released, TRADES, PART-T, and PART with the recipe's weight
   average and AWP (bench/train_step.py);
4. GPU evidence that needs no GPU, read from the compiled code or counted: PTX widths and registers, CUDA
   registers and spills, launches per call (bench/gpu_evidence.py); GPU times come only from
   `part-fast check --device cuda` on a GPU;
5. memory and scaling: peak memory of one training step of AT, PART (ours), PART as released and of the
   CAM + budget stage alone at batch 128 and 512; the budget stage's time and memory at 32, 64 and 224 px
   (bench/memory_report.py; on the device of --device: with cuda, GPU memory and times).

Writes <out>/<date>-<machine>.{json,md,png} and <date>-<machine>-memory.png. Figures are reported, never asserted; see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

from bench import gpu_evidence, memory_report, ops_report, stage_report, train_step
from bench.common import (
    Stopwatch,
    load_average,
    machine_info,
    show_messages,
    timed_backends,
    write_json,
    write_readme_blocks,
)
from bench.stage_markdown import markdown as stage_markdown
from part_fast.files import atomic_write_bytes, atomic_write_text

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
logger = logging.getLogger(__name__)

# Section 1 sizes: (x shape) and (CAM (B, h, w), output size) of the three dataset scales.
FULL_STEP_SHAPES = ((128, 3, 32, 32), (128, 3, 64, 64), (64, 3, 224, 224))
FULL_CAM_CASES = (((128, 4, 4), (32, 32)), ((128, 8, 8), (64, 64)), ((64, 7, 7), (224, 224)))
QUICK_STEP_SHAPES = ((128, 3, 32, 32),)
QUICK_CAM_CASES = (((128, 4, 4), (32, 32)),)
DTYPES = ("float32", "bfloat16")

README_BLOCKS = {"ops": ("<!-- bench:ops:start -->", "<!-- bench:ops:end -->"),
                 "summary": ("<!-- bench:summary:start -->", "<!-- bench:summary:end -->"),
                 "memory": memory_report.README_MARKERS}


def machine_slug(machine: dict) -> str:
    """A file-name-safe machine id: the GPU's name if any, else the CPU's, plus the core count."""
    name = machine.get("gpu") or machine.get("cpu", "unknown")
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*$", "", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "machine"
    return f"{slug}-{machine.get('logical_cores', 0)}c"


# ------------------------------------------------------------------------------------------- sections
# Each section measures and returns its figures, JSON-able; rendering (below) reads nothing else, so
# --from-json re-renders an earlier run without measuring.
def section_ops(device: torch.device, quick: bool) -> dict:
    shapes = QUICK_STEP_SHAPES if quick else FULL_STEP_SHAPES
    cams = QUICK_CAM_CASES if quick else FULL_CAM_CASES
    forms = ("(B,3,H,W)",) if quick else tuple(ops_report.EPS_FORMS)
    cases = ops_report.all_cases(timed_backends(device), shapes, DTYPES, forms, cams)
    logger.info("[1/5] ops: %d cases", len(cases))
    run_time, rounds = (0.15, 2) if quick else (1.0, 3)
    rows = ops_report.measure(cases, device, run_time, rounds)
    return {"rows": rows, "targets": ops_report.check_targets(rows), "run_time": run_time, "rounds": rounds}


def section_stage(quick: bool) -> dict:
    logger.info("[2/5] CAM + budget stage and PGD-10 vs the release")
    argv = ["--out", "", "--threads", str(torch.get_num_threads())]  # the harness's --threads, kept for what follows
    if quick:
        argv += ["--batch", "16", "--steps", "2", "--cam-reps", "1", "--release-reps", "1", "--pgd-reps", "1",
                 "--update-rounds", "1", "--time-budget", "0"]
    return stage_report.run_with(argv)


def section_train_step(quick: bool) -> dict:
    logger.info("[3/5] one training step: AT, PART (ours), PART (release), TRADES, PART-T, PART + EMA / AWP")
    return train_step.run(quick=quick, threads=torch.get_num_threads())  # the harness's --threads


def section_gpu(quick: bool) -> dict:
    logger.info("[4/5] GPU evidence: PTX, CUDA resource usage, launches")
    return gpu_evidence.measure(quick=quick)


def section_memory(quick: bool, device: torch.device) -> dict:
    logger.info("[5/5] memory of a training step and of the budget stage; the budget stage against the image size")
    return memory_report.run(quick=quick, device=device)


# The sections whose markdown the JSON also holds, and their renderers.
SECTION_MARKDOWN = {"stage": stage_markdown, "train_step": train_step.markdown, "gpu": gpu_evidence.markdown,
                    "memory": memory_report.markdown}


# ------------------------------------------------------------------------------------------ rendering
def targets_table(result: dict) -> str:
    lines = ["| section | target | measured | goal | met |", "|---|---|---:|---|---|"]
    # Recomputed from the rows, so a saved JSON re-renders with the current target definitions.
    for t in ops_report.check_targets(result["sections"]["ops"]["rows"]):
        lines.append(f"| ops | {t['target']} ({t['backend']}) | {t['value']:.2f} | ≥ {t['goal']} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    for t in result["sections"]["stage"].get("targets", []):
        value = f"{t['value']}" if t.get("op") == "=" else f"{t['value']:.2f}"
        lines.append(f"| stage | {t['target']} | {value} | {t.get('op', '≥')} {t['goal']:g} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    for t in result["sections"]["train_step"].get("targets", []):
        goal = "—" if t.get("goal") is None else f"{t.get('op', '≤')} {t['goal']:g}"
        met = "—" if t.get("met") is None else ("yes" if t["met"] else "NO")
        quick = " (quick)" if t.get("quick") else ""
        lines.append(f"| train step | {t['target']}{quick} | {t['value']:.3f} | {goal} | {met} |")
    return "\n".join(lines)


def header(result: dict) -> str:
    m = result["machine"]
    mode = "quick" if result["quick"] else "full"
    return (f"`python -m bench.run{' --quick' if result['quick'] else ''}` ({mode} run), {m['date']}, "
            f"{m['cpu']} ({m['logical_cores']} cores, {m['cpu_capability']})"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
            + f", torch {m['torch']}, {m['torch_threads']} threads; {result['seconds']:.0f} s in all.")


def ops_table(result: dict) -> str:
    rows = result["sections"]["ops"]["rows"]
    return ops_report.markdown(rows, ops_report.check_targets(rows), result["machine"])


def markdown(result: dict) -> str:
    """The whole report, rendered from the run's figures (never from the markdown the JSON keeps)."""
    s = result["sections"]
    return "\n\n".join([
        "# part_fast benchmark", header(result),
        "## Targets", targets_table(result),
        "## 1. Ops", ops_table(result),
        "## 2. CAM + budget stage and PGD-10 against the release", stage_markdown(s["stage"]),
        "## 3. One training step", train_step.markdown(s["train_step"]),
        "## 4. GPU evidence that needs no GPU", gpu_evidence.markdown(s["gpu"]),
    ] + (["## 5. Memory and scaling", memory_report.markdown(s["memory"])] if "memory" in s else [])) + "\n"


def readme_blocks(result: dict) -> dict:
    summary = "\n\n".join([header(result), targets_table(result), train_step.markdown(result["sections"]["train_step"])])
    blocks = {"ops": ops_table(result), "summary": summary}
    if "memory" in result["sections"]:
        blocks["memory"] = "\n\n".join([header(result), memory_report.markdown(result["sections"]["memory"])])
    return blocks


def write_readme(path: str | os.PathLike, result: dict) -> None:
    write_readme_blocks(path, {README_BLOCKS[name]: body for name, body in readme_blocks(result).items()})


def plot(result: dict, path: Path) -> None:
    """GB/s of every op row against the clone() bandwidth of its shape (the roof), one panel per dtype."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result["sections"]["ops"]["rows"] if r["op"] != "cam_eps_map"]
    dtypes = sorted({r.get("dtype", "float32") for r in rows})
    fig = Figure(figsize=(11, 3.6 * len(dtypes)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(dtypes), 1, squeeze=False)[:, 0]
    colours = {"release": "tab:red", "reference": "tab:orange", "cpu": "tab:blue", "cuda": "tab:green",
               "triton": "tab:purple", "torch": "black"}
    for ax, dtype in zip(axes, dtypes):
        sub = [r for r in rows if r.get("dtype", "float32") == dtype]
        groups = list(dict.fromkeys((r["op"], r["shape"], r["variant"]) for r in sub if r["op"] != "clone"))
        roofs = {r["shape"]: r["gb_per_s"] for r in sub if r["op"] == "clone"}
        impls = list(dict.fromkeys(r["impl"] for r in sub if r["op"] != "clone"))
        width = 0.8 / max(len(impls), 1)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for g, key in enumerate(groups):
                row = next((r for r in sub if (r["op"], r["shape"], r["variant"]) == key and r["impl"] == impl), None)
                if row:
                    xs.append(g + k * width)
                    ys.append(row["gb_per_s"])
            ax.bar(xs, ys, width, label=impl, color=colours.get(impl))
        for g, key in enumerate(groups):
            roof = roofs.get(key[1])
            if roof:
                ax.hlines(roof, g - 0.1, g + 0.9, colors="black", linestyles="dashed", linewidth=1)
        ax.set_xticks([g + 0.4 for g in range(len(groups))])
        ax.set_xticklabels([f"{op}\n{shape}\n{variant}" for op, shape, variant in groups], fontsize=6)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{dtype}: achieved bandwidth; dashed = clone() of the same shape (the roof)", fontsize=9)
        ax.legend(fontsize=7, ncols=len(impls))
    fig.tight_layout()

    def write(f):
        fig.savefig(f, format="png", dpi=110)

    atomic_write_bytes(path, write)


# ------------------------------------------------------------------------------------------------ main
SECTIONS = ("ops", "stage", "train_step", "gpu", "memory")


def run(quick: bool, device: torch.device) -> dict:
    """Measure every section: {"quick", "machine", "sections": {name: figures}, "seconds"}, JSON-able."""
    watch = Stopwatch()
    machine = machine_info(device)
    sections = {
        "ops": section_ops(device, quick),
        # The stage report sets glibc's malloc to keep freed memory; sections 3 and 4 run after it.
        "stage": section_stage(quick),
        "train_step": section_train_step(quick),
        "gpu": section_gpu(quick),
        # Memory is measured in a worker process with its own malloc settings (see bench/memory_report.py).
        "memory": section_memory(quick, device),
    }
    machine["load_average_after"] = load_average()
    return {"quick": quick, "machine": machine, "sections": sections, "seconds": watch.elapsed()}


def with_section_markdown(result: dict) -> dict:
    """The result as the JSON keeps it: each section in SECTION_MARKDOWN also holds its markdown as rendered
    when measured, for readers of the JSON (rendering never reads it back)."""
    sections = {name: ({**figures, "markdown": SECTION_MARKDOWN[name](figures)} if name in SECTION_MARKDOWN
                       else figures) for name, figures in result["sections"].items()}
    return {**result, "sections": sections}


def write_outputs(result: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    date = result["machine"]["date"][:10]
    stem = f"{date}-{machine_slug(result['machine'])}" + ("-quick" if result["quick"] else "")
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png",
             "memory_png": out / f"{stem}-memory.png"}
    write_json(paths["json"], with_section_markdown(result))
    atomic_write_text(paths["md"], markdown(result))
    plot(result, paths["png"])
    if "memory" in result["sections"]:  # absent from runs before section 5 existed
        memory_report.plot(result["sections"]["memory"], paths["memory_png"])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="part-fast bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every section at reduced size (< 3 min on 2 cores)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default bench/results/)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (GPU backends; sections 2-3 stay on the CPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--readme", help="regenerate this README's bench:ops and bench:summary blocks from the JSON")
    parser.add_argument("--from-json", help="measure nothing: re-render this earlier run's JSON")
    args = parser.parse_args(argv)
    show_messages(__name__)  # the harness's progress lines on stderr; the sections' own stay quiet
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            logger.error("part-fast bench: error: --device cuda but no GPU is visible")
            return 2
        result = run(args.quick, device)
        paths = write_outputs(result, Path(args.out))
        logger.info("wrote %s, %s, %s", paths["json"], paths["md"], paths["png"])
    print(markdown(result))
    if args.readme:
        write_readme(args.readme, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
