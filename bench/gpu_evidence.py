"""Section 4 of the benchmark harness: GPU evidence that needs no GPU. Markdown on stdout, JSON to --out.

    python -m bench.gpu_evidence                  # Triton for sm_80 and sm_90, everything else
    python -m bench.gpu_evidence --quick          # Triton for sm_90 only, no training variants
    python -m bench.gpu_evidence --out bench/results/gpu_evidence.json
    python -m bench.gpu_evidence --from-json bench/results/gpu_evidence.json   # re-render, measure nothing

What a CPU-only machine can say about the GPU code, all of it read from the compiled code or counted:

1. Triton kernels, compiled for sm_80 / sm_90 without a GPU (part_fast.kernels.ptx): the widths of the
   global loads and stores in the PTX, the registers and local (spill) memory ptxas allocated, shared memory.
2. CUDA kernels of the built extension (bench/cuobjdump.py): registers, spills, shared memory and the widths
   of the global accesses in the SASS.
3. Kernel launches per call: aten ops dispatched (each is at least one kernel launch on a GPU), counted on
   small CPU tensors with part_fast.check.op_count: the release chain, the reference backend, and ours with
   the compiled cpu backend forced.

No GPU time is computed here: GPU figures come only from `part-fast check --device cuda` on a GPU.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
from pathlib import Path

import torch

from bench.common import (
    EPS,
    EPS_LOW,
    STEP_SIZE,
    Stopwatch,
    kernels_per_call,
    show_messages,
    update_inputs,
    write_json,
)
from bench.cuobjdump import cuda_kernels
from part_fast import ops, reference

logger = logging.getLogger(__name__)

ARCHS = (80, 90)
# The pgd_step variants training launches besides ptx.kernel_specs() (marked † in the table): named here too,
# so that a saved run renders without importing Triton.
TRAINING_VARIANTS = ("pgd_step_bf16_eps_dense_f32", "pgd_step_bf16_eps_b1hw_f32", "pgd_step_fp32_eps_b1hw")
EPS_FORMS = ("(B,3,H,W)", "(B,1,H,W)", "scalar")
CAM_MODES = ("jet", "cam")
SMALL_SHAPE = (2, 3, 8, 8)  # launch counting: op counts do not depend on the size
SMALL_CAM = ((2, 4, 4), (32, 32))


def _eps_for(form: str, shape: tuple):
    if form == "scalar":
        return EPS
    channels = 3 if form == "(B,3,H,W)" else 1
    return torch.full((shape[0], channels, *shape[2:]), EPS)


# ------------------------------------------------------------------------------------- 1. Triton PTX
def triton_ptx(archs=ARCHS, training_variants: bool = True) -> tuple[list[dict], list[str]]:
    """part_fast.kernels.ptx's rows for every Triton kernel and arch.

    Args:
        archs: the compute capabilities to compile for.
        training_variants: also the pgd_step variants training launches (TRAINING_VARIANTS).

    Returns:
        (rows, notes): ptx.compile_kernels' rows (access widths in bits included), and why an arch has no
        rows (Triton missing, a compile error).
    """
    try:
        from part_fast.kernels import ptx
    except Exception as exc:  # noqa: BLE001 (triton missing or broken: whatever its import raises is the note)
        return [], [f"Triton kernels not compiled: part_fast.kernels.ptx cannot be imported ({exc!r})"]
    rows, notes = [], []
    if os.environ.get("TRITON_INTERPRET") == "1":
        notes.append("TRITON_INTERPRET=1: compiled by ptx.compile_kernels in a subprocess without it")
    for arch in archs:
        watch = Stopwatch()
        try:
            arch_rows = ptx.compile_kernels(arch, training_variants)
        except Exception as exc:  # noqa: BLE001 (a kernel that does not compile is a note saying why)
            notes.append(f"sm_{arch}: compile failed ({exc!r})"[:300])
            continue
        rows += arch_rows
        logger.info("  triton sm_%s: %d kernels in %.1f s", arch, len(arch_rows), watch.elapsed())
    return rows, notes


# -------------------------------------------------------------------------------------- 2. launches
def launches() -> tuple[list[dict], list[str]]:
    """Aten ops one call dispatches on small CPU tensors, counted by part_fast.check.op_count: each is at
    least one kernel launch when the tensors are on a GPU.

    Returns:
        (rows, notes): per op, implementation and eps form / cam mode, the launches and the op names; notes
        say what could not be counted.
    """
    device = torch.device("cpu")
    notes = []
    ours = "cpu" if "cpu" in ops.available_backends(device) else None
    if ours is None:
        notes.append("the compiled cpu backend is unavailable (part_fast._C not loaded): our op not counted")
    rows = []

    def count(op, impl, variant, backend, fn, *args):
        with ops.use_backend(backend):
            names = [n.removeprefix("aten.") for n in kernels_per_call(functools.partial(fn, *args), device)]
        rows.append({"op": op, "impl": impl, "variant": variant, "launches": len(names), "ops": names})

    for form in EPS_FORMS:
        x_adv, grad, x_nat, _ = update_inputs(SMALL_SHAPE, 3, device)
        step = (x_adv, grad, x_nat, _eps_for(form, SMALL_SHAPE), STEP_SIZE)
        count("pgd_step_", "release", form, None, reference.pgd_step_release, *step)
        count("pgd_step_", "reference", form, "reference", ops.pgd_step_, *step)
        if ours:
            count("pgd_step_", f"ours ({ours})", form, ours, ops.pgd_step_, *step)
    for form in EPS_FORMS:
        x_adv, _, x_nat, _ = update_inputs(SMALL_SHAPE, 3, device)
        projection = (x_adv, x_nat, _eps_for(form, SMALL_SHAPE))
        count("project_", "reference", form, "reference", ops.project_, *projection)
        if ours:
            count("project_", f"ours ({ours})", form, ours, ops.project_, *projection)
    cam = torch.randn(SMALL_CAM[0], generator=torch.Generator().manual_seed(0))
    for mode in CAM_MODES:
        budget = (cam, SMALL_CAM[1], EPS, EPS_LOW, mode)
        count("cam_eps_map", "reference", mode, "reference", ops.cam_eps_map, *budget)
        if ours:
            count("cam_eps_map", f"ours ({ours})", mode, ours, ops.cam_eps_map, *budget)
    logger.info("  launches: %d rows", len(rows))
    return rows, notes


# ------------------------------------------------------------------------------------------- rendering
def _same_or_pair(values: list) -> str:
    shown = ["—" if v is None else str(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def _bits(bits) -> str:
    return "—" if not bits else "/".join(map(str, bits))


def _ops_text(names: list[str], limit: int = 14) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    top = collections.Counter(names).most_common(6)
    return ", ".join(f"{n}×{c}" for n, c in top) + ", …"


def markdown(result: dict) -> str:
    """The section's markdown, rendered from measure()'s result (or a saved run's)."""
    # No "## 4." heading: the whole report's (bench/run.py) is the one heading, as for the other sections.
    lines = [
        # ---- 4.1
        "### 4.1 Triton kernels: PTX accesses and registers (compiled for the target, no GPU)",
        "",
        ("How to read it: widths are the bits one thread moves per global access instruction; "
         "128 (`v4.b32`, `v2.b64`) is the widest access a thread can issue, so a streaming kernel should show "
         "only 128 on its x / grad / x_nat / eps streams (a (1,C,1,1) eps is a per-element gather: 32; a "
         "(B,1,H,W) eps keeps 128 because its inner H×W run is contiguous). Registers are "
         "ptxas' allocation per thread (from the cubin); spill = local memory bytes, 0 means no spills. "
         "`pgd_step_*` are compiled for a 128×3×32×32 batch; rows marked † are the variants training launches "
         "(bf16 tensors with the float32 eps map cam_eps_map makes, and a (B,1,H,W) eps)."),
        "",
        "| kernel | arch | regs | spill B | shared B | load bits | store bits | PTX loads | PTX stores |",
        "|---|---|---:|---:|---:|---|---|---|---|",
    ]
    extra = set(TRAINING_VARIANTS)
    for r in sorted(result["ptx"], key=lambda r: (r["name"] in extra, r["name"], r["arch"])):
        name = r["name"] + (" †" if r["name"] in extra else "")
        regs = f"{r['registers']}" + ("" if r["registers_source"].startswith("cuobjdump") else " (virtual)")
        lines.append(
            f"| {name} | sm_{r['arch']} | {regs} | {'—' if r['local_bytes'] is None else r['local_bytes']} | "
            f"{r['shared_bytes']} | {_bits(r['load_bits'])} | {_bits(r['store_bits'])} | "
            f"{', '.join(f'`{a}`' for a in r['global_loads'])} | {', '.join(f'`{a}`' for a in r['global_stores'])} |"
        )
    lines += [f"Note: {n}" for n in result.get("ptx_notes", [])]
    # ---- 4.2
    lines += ["", "### 4.2 CUDA kernels of the built extension (cuobjdump)", "", result["cuda_status"] + ".", ""]
    rows = result["cuda_kernels"]
    if rows:
        archs = sorted({r["arch"] for r in rows})
        arch_text = " / ".join(f"sm_{a}" for a in archs)
        by_kernel = collections.defaultdict(dict)
        for r in rows:
            by_kernel[r["kernel"]][r["arch"]] = r
        spilling = sorted({r["kernel"] for r in rows if (r["local_bytes"] or 0) or (r["stack_bytes"] or 0)
                           or (r["spill_stores"] or 0) or (r["spill_loads"] or 0)})
        max_reg = max(rows, key=lambda r: r["registers"] or 0)
        lines += [
            ("How to read it: one row per template instance the build compiled (a value shown once is the same "
             f"for {arch_text}, else it reads {arch_text}). Registers per thread; stack = stack frame bytes, "
             "local = local-memory bytes, STL / LDL = spill store / load instructions in the SASS: all 0 means "
             "no spills. Shared = static shared memory (cam_eps_map_kernel adds dynamic shared memory sized by "
             "the CAM and output at launch). Load / store bits are the widths of the global accesses in the "
             "SASS (128 = `LDG.E.128`, the widest a thread can issue; 16 = a bf16/f16 element). A VEC 4 / VEC 8 "
             "instance streams x, grad, x_nat and a dense eps at 128 bits; its 32- or 16-bit accesses are the "
             "tail loop (the last numel % VEC elements) and, for a strided eps, the per-element eps gather; "
             "a \"strided eps by rows\" instance (the (B, 1, H, W) budget on a contiguous x) reads eps at 128 bits "
             "too, one row offset per chunk. "
             "VEC 1 instances are the fallback for pointers that are not 16-byte aligned. cam_eps_map_kernel's "
             "32-bit stores are by design: consecutive threads write consecutive pixels, so each warp-wide store "
             "covers 128 contiguous bytes (fully coalesced), and the kernel is bound by its float64 resize, not "
             "by store width."),
            "",
            (f"Summary: {len(by_kernel)} kernels, {len(rows)} kernel×arch entries; "
             f"{'no kernel spills (0 stack, 0 local, 0 STL/LDL)' if not spilling else 'SPILLS in: ' + ', '.join(spilling)}; "
             f"most registers: {max_reg['registers']} ({max_reg['kernel']}, sm_{max_reg['arch']})."),
            "",
            "| kernel | regs | stack B | local B | STL / LDL | shared B | load bits | store bits |",
            "|---|---:|---:|---:|---|---:|---|---|",
        ]
        for kernel in sorted(by_kernel):
            per = [by_kernel[kernel].get(a) or {} for a in archs]
            def col(key, per=per):
                return _same_or_pair([p.get(key) for p in per])

            spills = _same_or_pair([f"{p.get('spill_stores', '—')} / {p.get('spill_loads', '—')}" for p in per])
            lines.append(
                f"| `{kernel}` | {col('registers')} | {col('stack_bytes')} | {col('local_bytes')} | {spills} | "
                f"{col('shared_bytes_static')} | {_same_or_pair([_bits(p.get('load_bits')) for p in per])} | "
                f"{_same_or_pair([_bits(p.get('store_bits')) for p in per])} |"
            )
    # ---- 4.3
    lines += [
        "",
        "### 4.3 Kernel launches per call",
        "",
        ("How to read it: aten ops dispatched by one call on small CPU tensors, counted with a "
         "TorchDispatchMode (part_fast.check.op_count; views such as `detach` excluded). On a GPU each is at "
         "least one kernel launch. `ours` runs with the compiled cpu backend forced; the cuda and "
         "triton backends launch the same single kernel per call (one `<<<…>>>` / one Triton launch). "
         "What the launches cost on a GPU is measured by `part-fast check --device cuda`, not computed here."),
        "",
        "| op | impl | eps / mode | launches | ops |",
        "|---|---|---|---:|---|",
    ]
    for r in result["launches"]:
        lines.append(f"| {r['op']} | {r['impl']} | {r['variant']} | {r['launches']} | {_ops_text(r['ops'])} |")
    lines += [f"Note: {n}" for n in result.get("launch_notes", [])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- measuring
def measure(quick: bool = False) -> dict:
    """The section's figures, JSON-able (markdown() renders them).

    Args:
        quick: Triton for sm_90 only and without the training variants (Triton compilation is most of the
            run time).

    Returns:
        {"quick", "ptx", "ptx_notes", "cuda_kernels", "cuda_status", "launches", "launch_notes",
        "timings_s"}: the rows of each part, what each part could not do, and the seconds each part took.
    """
    timings, result = {}, {"quick": quick}
    parts = (  # (name, progress line, the result's keys for its two outputs, the part)
        ("ptx", "4.1 Triton PTX ...", ("ptx", "ptx_notes"),
         lambda: triton_ptx((90,) if quick else ARCHS, training_variants=not quick)),
        ("cuda_kernels", "4.2 CUDA kernels ...", ("cuda_kernels", "cuda_status"), cuda_kernels),
        ("launches", "4.3 launches ...", ("launches", "launch_notes"), launches),
    )
    watch = Stopwatch()
    for name, progress, (rows_key, notes_key), part in parts:
        logger.info(progress)
        result[rows_key], result[notes_key] = part()
        timings[name] = watch.lap()
    timings["total"] = watch.elapsed()
    result["timings_s"] = timings
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Triton for sm_90 only, no training variants")
    parser.add_argument("--out", help="also write the whole result (rows, notes, timings, markdown) as JSON here")
    parser.add_argument("--from-json", help="measure nothing: render this earlier --out JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())))
        return
    show_messages(__name__, "bench")
    result = measure(quick=args.quick)
    result["markdown"] = markdown(result)  # kept in the JSON for its readers; never read back
    print(result["markdown"])
    logger.info("\n(section 4 took %.1f s)", result["timings_s"]["total"])
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
