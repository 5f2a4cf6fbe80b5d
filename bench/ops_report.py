"""Side-by-side timings of part_fast's ops in ONE process: a markdown table on stdout, JSON to --out.

    python -m bench.ops_report --out bench/ops_report_cpu.json                 # cpu + reference backends
    python -m bench.ops_report --device cuda --out bench/ops_report_cuda.json  # cuda + triton + reference

Every row is timed on the same inputs the other backends of its group see, in the same run, next to a
`x.clone()` of the same shape (the memory-bandwidth yardstick). Figures are reported, never asserted.
See bench/README.md for the columns and how bytes are counted. Also the case list and builders used by
bench/test_bench_ops.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

os.environ.setdefault("KINETO_LOG_LEVEL", "3")  # keep the CUDA profiler's log lines out of the report

import torch

from bench.common import (
    EPS,
    EPS_LOW,
    STEP_SIZE,
    block_median,
    cell,
    kernels_per_call,
    load_average,
    machine_info,
    timed_backends,
    update_inputs,
    write_json,
    write_readme_blocks,
)
from part_fast import ops, reference

STEP_SHAPES = ((128, 3, 32, 32), (512, 3, 64, 64))  # a CIFAR batch; a large one (25 MB per tensor)
EPS_FORMS = {"(B,3,H,W)": 3, "(B,1,H,W)": 1}  # eps form -> its channel count
CAM_SHAPE, CAM_OUT, CAM_MODES = (128, 4, 4), (32, 32), ("jet", "cam")
RELEASE = "release"  # reference.pgd_step_release: the released code's eager chain
CLONE = "torch"  # x.clone(): one read and one write of x, the bandwidth yardstick
COMPILED = ("cpu", "cuda", "triton")


@dataclass(frozen=True)
class Case:
    op: str  # "pgd_step_", "project_", "cam_eps_map" or "clone"
    impl: str  # a part_fast backend, RELEASE or CLONE
    shape: tuple  # x's shape; the CAM's (B, h, w) for cam_eps_map
    variant: str = ""  # the eps form "(B,C,H,W)" or the cam mode
    dtype: str = "float32"  # of x_adv / grad / x_nat (eps and CAMs stay float32)
    cam_out: tuple = CAM_OUT  # cam_eps_map's output size

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def backend(self) -> str | None:
        """The backend to force while timing (None: the case calls no part_fast op)."""
        return self.impl if self.impl in ops.BACKENDS else None

    @property
    def shape_text(self) -> str:
        text = "×".join(map(str, self.shape))
        return f"{text}→{self.cam_out[0]}×{self.cam_out[1]}" if self.op == "cam_eps_map" else text

    @property
    def clone_shape(self) -> tuple:
        """Shape of the clone this row's bandwidth is compared with: x's, or the (B,3,H,W) CAM output."""
        return (self.shape[0], 3, *self.cam_out) if self.op == "cam_eps_map" else self.shape

    @property
    def clone_dtype(self) -> str:
        return "float32" if self.op == "cam_eps_map" else self.dtype

    def label(self) -> str:
        """An ASCII id, e.g. pgd_step_-cpu-128x3x32x32-(B,3,H,W)."""
        shape = self.shape_text.replace("×", "x").replace("→", "to")
        dtype = "" if self.dtype == "float32" else self.dtype
        return "-".join(filter(None, (self.op, self.impl, shape, self.variant, dtype)))


def all_cases(backends: list[str], step_shapes=STEP_SHAPES, dtypes=("float32",), eps_forms=tuple(EPS_FORMS),
              cam_cases=((CAM_SHAPE, CAM_OUT),)) -> list[Case]:
    """Every case, in table order: per step shape and dtype the clone, pgd_step_ (release chain first),
    project_; then cam_eps_map per CAM size and mode."""
    cases = []
    for shape in step_shapes:
        for dtype in dtypes:
            cases.append(Case("clone", CLONE, shape, dtype=dtype))
            for op, impls in (("pgd_step_", (RELEASE, *backends)), ("project_", backends)):
                cases += [Case(op, impl, shape, form, dtype) for form in eps_forms for impl in impls]
    for cam_shape, cam_out in cam_cases:
        yardstick = Case("clone", CLONE, (cam_shape[0], 3, *cam_out))  # the bandwidth of the map it writes
        if yardstick not in cases:
            cases.append(yardstick)
        cases += [Case("cam_eps_map", b, tuple(cam_shape), mode, cam_out=tuple(cam_out)) for mode in CAM_MODES
                  for b in backends]
    return cases


def build(case: Case, device: torch.device) -> tuple[Callable[[], object], int]:
    """(fn, nbytes): fn() runs the case once (the backend is forced by the caller), nbytes is the memory
    traffic the op cannot avoid: every input read once, every output written once."""
    if case.op == "cam_eps_map":
        cam = torch.randn(case.shape, generator=torch.Generator().manual_seed(0)).to(device)
        out = case.cam_out
        out_nbytes = cam.shape[0] * (3 if case.variant == "jet" else 1) * out[0] * out[1] * 4
        return (lambda: ops.cam_eps_map(cam, out, EPS, EPS_LOW, case.variant)), cam.nbytes + out_nbytes
    x_adv, grad, x_nat, eps = update_inputs(case.shape, EPS_FORMS.get(case.variant, 3), device,
                                            dtype=case.torch_dtype)
    if case.op == "clone":
        return x_adv.clone, 2 * x_adv.nbytes
    if case.op == "project_":
        return (lambda: ops.project_(x_adv, x_nat, eps)), 2 * x_adv.nbytes + x_nat.nbytes + eps.nbytes
    step_nbytes = 2 * x_adv.nbytes + grad.nbytes + x_nat.nbytes + eps.nbytes
    if case.impl == RELEASE:
        return (lambda: reference.pgd_step_release(x_adv, grad, x_nat, eps, STEP_SIZE)), step_nbytes
    return (lambda: ops.pgd_step_(x_adv, grad, x_nat, eps, STEP_SIZE)), step_nbytes


def measure(cases: list[Case], device: torch.device, run_time: float, rounds: int) -> list[dict]:
    """Time every case in `rounds` interleaved rounds, each adding run_time / rounds of blocks. A case's
    time is the median of its blocks in its quickest round: other work on the machine only slows calls
    down, and interleaving gives every case the same chances of a quiet round."""
    round_medians = {case: [] for case in cases}
    nbytes, kernels = {}, {}
    for _ in range(rounds):
        for case in cases:
            fn, nbytes[case] = build(case, device)
            with ops.use_backend(case.backend):
                round_medians[case].append(block_median(fn, device, run_time / rounds))
                if case not in kernels:
                    kernels[case] = kernels_per_call(fn, device)
    seconds = {case: min(medians) for case, medians in round_medians.items()}
    rows = []
    for case in cases:
        gb_per_s = nbytes[case] / seconds[case] / 1e9
        clone = Case("clone", CLONE, case.clone_shape, dtype=case.clone_dtype)
        clone_gb_per_s = nbytes[clone] / seconds[clone] / 1e9 if clone in seconds else None
        release = seconds.get(replace(case, impl=RELEASE))
        reference_time = seconds.get(replace(case, impl="reference"))
        rows.append(asdict(case) | {
            "shape": case.shape_text,
            "median_us": seconds[case] * 1e6,
            "round_medians_us": [t * 1e6 for t in round_medians[case]],
            "bytes": nbytes[case],
            "gb_per_s": gb_per_s,
            "pct_clone_bw": 100 * gb_per_s / clone_gb_per_s if clone_gb_per_s else None,
            "speedup_vs_release": release / seconds[case] if release else None,
            "speedup_vs_reference": reference_time / seconds[case] if reference_time else None,
            "kernels_per_call": len(kernels[case]),
            "kernels": kernels[case],
        })
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, per compiled backend: reported as met / not met, never asserted."""
    # The speed-up is judged at the CIFAR batch, the bandwidth at the largest step shape of the run.
    shapes = {r["shape"]: math.prod(int(v) for v in r["shape"].split("×")) for r in rows if r["op"] == "pgd_step_"}
    small = Case("pgd_step_", "", STEP_SHAPES[0]).shape_text
    large = max(shapes, key=shapes.get) if shapes else Case("pgd_step_", "", STEP_SHAPES[1]).shape_text
    cam_shape = Case("cam_eps_map", "", CAM_SHAPE).shape_text
    full_eps = "(B,3,H,W)"
    goals = {  # (op, shape, variant) -> (description, the row's figure, goal)
        ("pgd_step_", small, full_eps): (f"pgd_step_ × release, {small}, {full_eps} eps", "speedup_vs_release", 10),
        ("pgd_step_", large, full_eps): (f"pgd_step_ % clone GB/s, {large}, {full_eps} eps", "pct_clone_bw", 70),
    }
    for mode in CAM_MODES:
        goals[("cam_eps_map", cam_shape, mode)] = (f"cam_eps_map × reference, mode {mode}", "speedup_vs_reference", 3)
    results = []
    for r in rows:
        goal = goals.get((r["op"], r["shape"], r["variant"]))
        if goal and r["impl"] in COMPILED and r.get("dtype", "float32") == "float32":
            name, key, target = goal
            results.append({"target": name, "backend": r["impl"], "value": r[key], "goal": target,
                            "met": r[key] >= target})
    return results


def _variant(row: dict) -> str:
    dtype = row.get("dtype", "float32")
    text = row["variant"] or "—"
    return text if dtype == "float32" else f"{text} {'bf16' if dtype == 'bfloat16' else dtype}"


def markdown(rows: list[dict], targets: list[dict], machine: dict) -> str:
    lines = [
        f"{machine['cpu']} ({machine['logical_cores']} cores, {machine['cpu_capability']}), "
        + (f"GPU {machine['gpu']}, " if machine["gpu"] else "")
        + f"torch {machine['torch']}, {machine['torch_threads']} threads, "
        + f"{', '.join(sorted({r.get('dtype', 'float32') for r in rows}))}, {machine['date']}, "
        + f"load average before/after {machine['load_average_before'][0]:.1f}/{machine['load_average_after'][0]:.1f}",
        "",
    ]
    noisy = [r for r in rows if max(r["round_medians_us"]) > 1.5 * min(r["round_medians_us"])]
    if noisy:
        lines += [(f"Note: {len(noisy)} of {len(rows)} rows varied > 1.5× between rounds (other work on the "
                   "machine); each row reports its quickest round."), ""]
    lines += [
        ("| op | impl | shape | eps / mode | median µs | MB moved | GB/s | % clone BW | × release | × reference "
         "| kernels |"),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['shape']} | {_variant(r)} | {r['median_us']:.1f} | "
            f"{r['bytes'] / 1e6:.2f} | {r['gb_per_s']:.1f} | {cell(r['pct_clone_bw'], '.0f')} | "
            f"{cell(r['speedup_vs_release'], '.1f')} | {cell(r['speedup_vs_reference'], '.1f')} | "
            f"{r['kernels_per_call']} |"
        )
    lines += ["", "| target | backend | measured | goal | met |", "|---|---|---:|---:|---|"]
    for t in targets:
        met = "yes" if t["met"] else "NO"
        lines.append(f"| {t['target']} | {t['backend']} | {t['value']:.2f} | ≥ {t['goal']} | {met} |")
    return "\n".join(lines)


README_START, README_END = "<!-- bench:ops:start -->", "<!-- bench:ops:end -->"


def write_readme_table(path: str, table: str) -> None:
    """Replace the README's bench:ops block with `table`."""
    write_readme_blocks(path, {(README_START, README_END): table})


def measure_report(args) -> dict:
    """Every case of this machine's backends, timed: the rows, their targets and the machine."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    machine = machine_info(device)
    rows = measure(all_cases(timed_backends(device)), device, args.run_time, args.rounds)
    machine["load_average_after"] = load_average()
    return {"machine": machine, "rows": rows, "targets": check_targets(rows)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (cpu, reference) or cuda (cuda, triton, reference)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--run-time", type=float, default=1.0, help="seconds of timed blocks per row, all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all rows")
    parser.add_argument("--out", help="write the rows, targets and machine info as JSON here")
    parser.add_argument("--from-json", help="measure nothing: render the table of this earlier --out JSON")
    parser.add_argument("--readme", help="also write the table into this file's bench:ops block (README.md)")
    args = parser.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        report = measure_report(args)
    table = markdown(report["rows"], report["targets"], report["machine"])
    print(table)
    if args.out and not args.from_json:
        write_json(args.out, report)
    if args.readme:
        write_readme_table(args.readme, table)


if __name__ == "__main__":
    main()
