"""Section 4 of the benchmark harness: GPU evidence that needs no GPU. Markdown on stdout, JSON to --out.

    python -m bench.gpu_evidence                  # Triton for sm_80 and sm_90, everything else
    python -m bench.gpu_evidence --quick          # Triton for sm_90 only, no extra kernel variants
    python -m bench.gpu_evidence --out bench/results/gpu_evidence.json

What a CPU-only machine can still say about the GPU code:

1. Triton kernels, compiled for sm_80 / sm_90 without a GPU (part_fast.kernels.ptx): the widths of the
   global loads and stores in the PTX, the registers and local (spill) memory ptxas allocated, shared memory.
2. CUDA kernels of the built extension (part_fast/_C_cuda*.so): registers, stack frame, local memory and static
   shared memory per kernel (`cuobjdump --dump-resource-usage`), plus, from the SASS (`cuobjdump -sass`),
   spill stores / loads (STL / LDL instructions) and the widths of the global accesses (LDG / STG).
3. Projected H100 time per op from the bytes it must move (every input read once, every output written
   once) at an assumed bandwidth, next to the released eager chain (reference.pgd_step_release), whose
   bytes are tallied op by op on meta tensors, and a per-launch latency floor.
4. Kernel launches per call: aten ops dispatched (each is at least one kernel launch on a GPU), counted
   on small CPU tensors with bench.common.kernels_per_call: the release chain, the reference backend,
   and ours with the compiled cpu backend forced.

Nothing here runs on a GPU and nothing is asserted: the figures are evidence and projections.
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import (
    EPS,
    EPS_LOW,
    STEP_SIZE,
    kernels_per_call,
    update_inputs,
    write_json,
)
from part_fast import ops, reference

# ---------------------------------------------------------------------------------------- assumptions
HBM_PEAK_TB_S = 3.35  # H100 SXM HBM3 datasheet peak
HBM_TB_S = 3.0  # what a streaming kernel achieves: the figure the projections use
LAUNCH_US = 2.5  # one kernel launch, host + GPU, as a latency floor per kernel
ASSUMPTIONS = {
    "gpu": "H100 SXM (HBM3)",
    "hbm_peak_tb_s": HBM_PEAK_TB_S,
    "hbm_achievable_tb_s": HBM_TB_S,
    "launch_us": LAUNCH_US,
    "bytes": "every input read once + every output written once; eps float32 for every dtype",
    "projected_us": "sum over the kernels of max(kernel bytes / achievable bandwidth, launch latency)",
}

ARCHS = (80, 90)
# (name, x shape, CAM (h, w)): CIFAR / TinyImageNet CAMs from a stride-8 ResNet-18 trunk, ImageNet 7x7.
SIZES = (
    ("CIFAR", (128, 3, 32, 32), (4, 4)),
    ("TinyImageNet", (128, 3, 64, 64), (8, 8)),
    ("ImageNet-like", (64, 3, 224, 224), (7, 7)),
)
EPS_FORMS = ("(B,3,H,W)", "(B,1,H,W)", "scalar")
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
CAM_MODES = ("jet", "cam")
SMALL_SHAPE = (2, 3, 8, 8)  # launch counting: op counts do not depend on the size
SMALL_CAM = ((2, 4, 4), (32, 32))


def _eps_for(form: str, shape: tuple, device="cpu", dtype=torch.float32):
    if form == "scalar":
        return EPS
    channels = 3 if form == "(B,3,H,W)" else 1
    return torch.full((shape[0], channels, *shape[2:]), EPS, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------- 1. Triton PTX
def ptx_access_bits(access: str) -> int | None:
    """Bits one thread moves with a PTX access, e.g. ld.global.v4.b32 -> 128, ld.global.b64 -> 64."""
    vec = re.search(r"\.v(\d+)\.", access)
    elem = re.findall(r"\.[bfsu](\d+)\b", access)
    if not elem:
        return None
    return (int(vec.group(1)) if vec else 1) * int(elem[-1])


EXTRA_TRITON_VARIANTS = ("pgd_step_bf16_eps_dense_f32", "pgd_step_bf16_eps_b1hw_f32", "pgd_step_fp32_eps_b1hw")


def _extra_triton_specs() -> list[dict]:
    """pgd_step_kernel variants ptx.kernel_specs() does not list but training runs: bf16 tensors with the
    float32 eps map cam_eps_map produces (dense and channel-shared), and a float32 (B,1,H,W) eps."""
    from part_fast.kernels import pgd_step as pgd_module

    shape = (128, 3, 32, 32)
    x32 = torch.empty(shape, dtype=torch.float32, device="meta")
    x16 = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    dense = torch.empty(shape, dtype=torch.float32, device="meta")
    shared = torch.empty((128, 1, 32, 32), dtype=torch.float32, device="meta")
    specs = []
    operands = {"pgd_step_bf16_eps_dense_f32": (x16, dense), "pgd_step_bf16_eps_b1hw_f32": (x16, shared),
                "pgd_step_fp32_eps_b1hw": (x32, shared)}
    for name in EXTRA_TRITON_VARIANTS:
        x, eps = operands[name]
        _, args, constexprs = pgd_module.launch_args(x, x, x, eps, STEP_SIZE, 0.0, 1.0)
        specs.append({"name": name, "fn": pgd_module.pgd_step_kernel, "args": args, "constexprs": constexprs,
                      "options": {"num_warps": pgd_module.NUM_WARPS}})
    return specs


def triton_ptx(archs=ARCHS, extra_variants: bool = True, log=print) -> tuple[list[dict], list[str]]:
    """(rows, notes): part_fast.kernels.ptx's report per Triton kernel and arch, with the access widths in
    bits. Compiles in this process through ptx's own functions (ptx.compile_kernels re-runs itself in a
    subprocess under TRITON_INTERPRET=1, where the extra variants are then skipped)."""
    notes = []
    try:
        from part_fast.kernels import ptx
    except Exception as exc:  # noqa: BLE001 (triton missing or broken: whatever its import raises is the note)
        return [], [f"Triton kernels not compiled: part_fast.kernels.ptx cannot be imported ({exc!r})"]
    rows = []
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted:
        notes.append("TRITON_INTERPRET=1: compiled via ptx.compile_kernels in a subprocess; extra variants skipped")
    for arch in archs:
        t0 = time.perf_counter()
        if interpreted:
            arch_rows = ptx.compile_kernels(arch)
        else:
            specs = ptx.kernel_specs() + (_extra_triton_specs() if extra_variants else [])
            arch_rows = []
            for spec in specs:
                try:
                    arch_rows.append(ptx._compile_one(spec, arch))
                except Exception as exc:  # noqa: BLE001 (a kernel that does not compile is a row saying why)
                    arch_rows.append({"name": spec["name"], "arch": arch, "error": repr(exc)})
        for row in arch_rows:
            row["load_bits"] = sorted({ptx_access_bits(a) for a in row.get("global_loads", [])} - {None})
            row["store_bits"] = sorted({ptx_access_bits(a) for a in row.get("global_stores", [])} - {None})
        rows += arch_rows
        log(f"  triton sm_{arch}: {len(arch_rows)} kernels in {time.perf_counter() - t0:.1f} s")
    return rows, notes


# ---------------------------------------------------------------------------------- 2. CUDA kernels
def find_cuobjdump() -> str | None:
    """The cuobjdump Triton ships (triton/backends/nvidia/bin), else one on PATH."""
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    except Exception:  # noqa: BLE001 (no triton or a broken one: PATH is then the only place to look)
        path = None
    if path is not None and path.is_file() and os.access(path, os.X_OK):
        return str(path)
    return shutil.which("cuobjdump")


def extension_path() -> str | None:
    """The library holding the CUDA kernels (part_fast._C_cuda; part_fast._C holds the CPU kernels)."""
    spec = importlib.util.find_spec("part_fast._C_cuda")
    return spec.origin if spec is not None else None


def _eps_kind_names() -> dict[str, str]:
    """EpsPlan::Kind value -> name, read from csrc/checks.h when the source tree is here."""
    names = {}
    header = Path(__file__).resolve().parents[1] / "csrc" / "checks.h"
    try:
        body = re.search(r"enum\s+Kind\s*\{([^}]*)\}", header.read_text()).group(1)
        for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", body):
            names[value] = name.lower()
    except (OSError, AttributeError):
        pass
    return names


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    lines = out.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {}


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


_TYPE_SHORT = {"float": "f32", "double": "f64", "c10::BFloat16": "bf16", "c10::Half": "f16",
               "unsigned int": "u32", "unsigned long": "u64", "int": "i32", "long": "i64"}


def short_kernel_name(mangled: str, demangled: str | None, kinds: dict[str, str]) -> str:
    """A readable name: pgd_kernel<VEC 8, step, dense eps, x bf16, eps f32, u32 index>,
    cam_eps_map_kernel<cam f32, jet>; other kernels: the demangled name without namespaces and arguments."""
    if not demangled:
        match = re.search(r"\d+([A-Za-z_]\w*?_kernel)I", mangled)
        return match.group(1) if match else mangled[:60]
    text = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    cut = min([i for i in (text.find("<"), text.find("(")) if i >= 0], default=len(text))
    base = text[:cut].split("::")[-1]
    targs = []
    if cut < len(text) and text[cut] == "<":
        depth = 0
        for i in range(cut, len(text)):
            depth += text[i] == "<"
            depth -= text[i] == ">"
            if depth == 0:
                targs = _split_top_level(text[cut + 1:i])
                break
    shortened = []
    for arg in targs:
        kind = re.fullmatch(r"\(\S*Kind\)(\d+)", arg)
        if kind:
            shortened.append(f"{kinds.get(kind.group(1), 'kind ' + kind.group(1))} eps")
        else:
            shortened.append(_TYPE_SHORT.get(arg, arg.replace("part_fast::", "").replace("c10::", "")))
    if base == "pgd_kernel" and len(shortened) == 7:
        vec, step, kind, eps_rows, x_t, eps_t, index_t = shortened
        if eps_rows == "true":  # a strided eps read a row (one offset) per VEC chunk
            kind += " by rows"
        eps_part = "" if kind.startswith("scalar") else f", eps {eps_t}"
        op = "step" if step == "true" else "project"
        return f"pgd_kernel<VEC {vec}, {op}, {kind}, x {x_t}{eps_part}, {index_t} index>"
    if base == "cam_eps_map_kernel" and len(shortened) == 2:
        return f"cam_eps_map_kernel<cam {shortened[0]}, {'jet' if shortened[1] == 'true' else 'cam'}>"
    return f"{base}<{', '.join(shortened)}>" if shortened else base


_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RES_VALUES = re.compile(r"\b(REG|STACK|SHARED|LOCAL|CONSTANT\[0\]):(\d+)")
_ARCH = re.compile(r"^\s*arch\s*=\s*sm_(\d+)")
_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def parse_resource_usage(text: str) -> dict[tuple[int, str], dict]:
    """cuobjdump --dump-resource-usage text -> {(arch, mangled name): {REG, STACK, SHARED, LOCAL, ...}}."""
    usage, arch, function = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = int(m.group(1))
        elif m := _RES_FUNCTION.match(line):
            function = m.group(1)
        elif function is not None and (values := _RES_VALUES.findall(line)):
            usage[(arch, function)] = {k: int(v) for k, v in values}
            function = None
    return usage


def sass_access_bits(opcode: str) -> int:
    mods = opcode.split(".")[1:]
    for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if token in mods:
            return bits
    return 32


def parse_sass(text: str) -> dict[tuple[int, str], dict]:
    """cuobjdump -sass text -> {(arch, mangled): {"STL": n, "LDL": n, "LDG": {opcode: n}, "STG": {...}}}."""
    out, arch, function = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = int(m.group(1))
            continue
        if m := _SASS_FUNCTION.match(line):
            function = m.group(1)
            out[(arch, function)] = {"STL": 0, "LDL": 0, "LDG": collections.Counter(), "STG": collections.Counter()}
            continue
        if function is None or not (m := _SASS_OPCODE.search(line)):
            continue
        opcode = m.group(1)
        base = opcode.split(".")[0]
        entry = out[(arch, function)]
        if base in ("STL", "LDL"):
            entry[base] += 1
        elif base in ("LDG", "STG"):
            entry[base][opcode] += 1
    return out


def cuda_kernels(log=print) -> tuple[list[dict], str]:
    """(rows, status): one row per CUDA kernel and arch of the built extension; status says what was read
    or why there are no rows (no extension, a CPU-only build, no cuobjdump)."""
    so = extension_path()
    if so is None:
        return [], ("part_fast._C_cuda is not built (a CPU-only or pure-PyTorch install: rebuild with FORCE_CUDA=1 "
                    "to inspect the CUDA kernels)")
    tool = find_cuobjdump()
    if tool is None:
        return [], f"no cuobjdump found (neither in triton's bin nor on PATH): {so} not inspected"
    try:
        res = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=False)
    except OSError as exc:
        return [], f"{tool} cannot run ({exc!r})"
    usage = parse_resource_usage(res.stdout)
    if not usage:
        detail = (res.stderr or res.stdout).strip().splitlines()
        return [], (f"no CUDA device code in {os.path.basename(so)} (a CPU-only build: rebuild with FORCE_CUDA=1 "
                    f"to inspect the CUDA kernels); cuobjdump said: {detail[-1] if detail else 'nothing'}")
    sass, sass_note = {}, ""
    try:
        sass_run = subprocess.run([tool, "-sass", so], capture_output=True, text=True, timeout=300, check=False)
        sass = parse_sass(sass_run.stdout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        sass_note = f"; SASS not read ({exc!r}): no spill instruction counts or access widths"
    names = sorted({name for _, name in usage})
    demangled, kinds = _demangle(names), _eps_kind_names()
    rows = []
    for (arch, name), values in sorted(usage.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        code = sass.get((arch, name))
        rows.append({
            "kernel": short_kernel_name(name, demangled.get(name), kinds),
            "mangled": name,
            "demangled": demangled.get(name),
            "arch": arch,
            "registers": values.get("REG"),
            "stack_bytes": values.get("STACK"),
            "local_bytes": values.get("LOCAL"),
            "shared_bytes_static": values.get("SHARED"),
            "param_constant_bytes": values.get("CONSTANT[0]"),
            "spill_stores": code["STL"] if code else None,
            "spill_loads": code["LDL"] if code else None,
            "global_loads": dict(sorted(code["LDG"].items())) if code else None,
            "global_stores": dict(sorted(code["STG"].items())) if code else None,
            "load_bits": sorted({sass_access_bits(o) for o in code["LDG"]}) if code else None,
            "store_bits": sorted({sass_access_bits(o) for o in code["STG"]}) if code else None,
        })
    archs = sorted({r["arch"] for r in rows})
    tool_label = "the cuobjdump shipped with triton" if "triton" in tool else tool
    status = (f"{len(names)} kernels × sm_{', sm_'.join(map(str, archs))} in {os.path.basename(so)}, read with "
              f"{tool_label} (resource usage{', SASS' if sass else ''}){sass_note}")
    log(f"  cuda: {status}")
    return rows, status


# ------------------------------------------------------------------------------------ 3. projections
def _us(nbytes: float) -> float:
    return nbytes / (HBM_TB_S * 1e12) * 1e6


def _projected_us(kernel_bytes: list[int]) -> float:
    return sum(max(_us(b), LAUNCH_US) for b in kernel_bytes)


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor covers: a broadcast (stride 0) dim adds nothing, as a read of it hits the
    same elements again."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))) * t.element_size()


class _ByteTally(TorchDispatchMode):
    """Per dispatched (non-view) aten op: the bytes of its tensor inputs (read once) and outputs (written
    once). On meta tensors nothing is computed, so full-size shapes cost nothing."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            read = sum(_span_bytes(t) for t in inputs)
            written = sum(_span_bytes(t) for t in outputs)
            self.ops.append({"op": str(func.overloadpacket).removeprefix("aten."), "read": read,
                             "written": written, "bytes": read + written})
        return out


def release_chain_bytes(shape: tuple, dtype: torch.dtype, eps_form: str, device="meta") -> list[dict]:
    """reference.pgd_step_release at full size on meta tensors: per eager op, bytes read and written."""
    x_adv, grad, x_nat = (torch.empty(shape, dtype=dtype, device=device) for _ in range(3))
    eps = _eps_for(eps_form, shape, device)  # float32 for every dtype, as cam_eps_map produces it
    with _ByteTally() as tally:
        reference.pgd_step_release(x_adv, grad, x_nat, eps, STEP_SIZE)
    return tally.ops


def fused_bytes(op: str, shape: tuple, dtype: torch.dtype, eps_form: str) -> int:
    numel = torch.Size(shape).numel()
    x = numel * torch.empty((), dtype=dtype).element_size()
    eps = 0 if eps_form == "scalar" else (numel if eps_form == "(B,3,H,W)" else numel // shape[1]) * 4
    # pgd_step_: x_adv read + written, grad, x_nat, eps; project_: no grad
    return (4 if op == "pgd_step_" else 3) * x + eps


def projections(log=print) -> tuple[list[dict], dict]:
    rows = []
    release_ops_checked = {}
    for size_name, shape, cam_hw in SIZES:
        for dtype_name, dtype in DTYPES.items():
            for form in EPS_FORMS:
                common = {"size": size_name, "shape": list(shape), "dtype": dtype_name, "eps": form}
                for op in ("pgd_step_", "project_"):
                    nbytes = fused_bytes(op, shape, dtype, form)
                    rows.append(common | {"op": op, "impl": "fused", "bytes": nbytes, "launches": 1,
                                          "memory_us": _us(nbytes), "launch_floor_us": LAUNCH_US,
                                          "projected_us": _projected_us([nbytes])})
                chain = release_chain_bytes(shape, dtype, form)
                kernel_bytes = [o["bytes"] for o in chain]
                release_ops_checked[(dtype_name, form)] = [o["op"] for o in chain]
                rows.append(common | {"op": "pgd_step_", "impl": "release", "bytes": sum(kernel_bytes),
                                      "launches": len(chain), "memory_us": _us(sum(kernel_bytes)),
                                      "launch_floor_us": LAUNCH_US * len(chain),
                                      "projected_us": _projected_us(kernel_bytes), "kernels": chain})
        batch = shape[0]
        for mode in CAM_MODES:
            out_shape = (batch, 3 if mode == "jet" else 1, *shape[2:])
            nbytes = batch * cam_hw[0] * cam_hw[1] * 4 + torch.Size(out_shape).numel() * 4
            rows.append({"size": size_name, "op": "cam_eps_map", "impl": "fused", "mode": mode,
                         "cam_shape": [batch, *cam_hw], "out_shape": list(out_shape), "bytes": nbytes,
                         "launches": 1, "memory_us": _us(nbytes), "launch_floor_us": LAUNCH_US,
                         "projected_us": _projected_us([nbytes])})
    # The byte tally runs on meta tensors: check it sees the op sequence the CPU dispatches.
    consistent = {}
    for (dtype_name, form), names in release_ops_checked.items():
        x_adv, grad, x_nat, _ = update_inputs(SMALL_SHAPE, 3, torch.device("cpu"))
        x_adv, grad, x_nat = (t.to(DTYPES[dtype_name]) for t in (x_adv, grad, x_nat))
        eps = _eps_for(form, SMALL_SHAPE)
        cpu_names = kernels_per_call(functools.partial(reference.pgd_step_release, x_adv, grad, x_nat, eps, STEP_SIZE),
                                     torch.device("cpu"))
        consistent[f"{dtype_name} {form}"] = [n.removeprefix("aten.") for n in cpu_names] == names
    log(f"  projections: {len(rows)} rows; meta tally matches the CPU op sequence: {all(consistent.values())}")
    return rows, consistent


# -------------------------------------------------------------------------------------- 4. launches
def launches(log=print) -> tuple[list[dict], list[str]]:
    """Aten ops one call dispatches on small CPU tensors (bench.common.kernels_per_call): each is at
    least one kernel launch when the tensors are on a GPU."""
    device = torch.device("cpu")
    notes = []
    ours = "cpu" if "cpu" in ops.available_backends(device) else None
    if ours is None:
        notes.append("the compiled cpu backend is unavailable (part_fast._C not loaded): our op not counted")
    rows = []

    def count(op, impl, variant, backend, fn, *args):
        with ops.use_backend(backend):
            names = [n.removeprefix("aten.") for n in kernels_per_call(functools.partial(fn, *args), device)]
        rows.append({"op": op, "impl": impl, "variant": variant, "launches": len(names),
                     "launch_floor_us": LAUNCH_US * len(names), "ops": names})

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
    log(f"  launches: {len(rows)} rows")
    return rows, notes


# -------------------------------------------------------------------------------------------- markdown
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
    lines = ["## 4. GPU evidence that needs no GPU", ""]
    # ---- 4.1
    lines += [
        "### 4.1 Triton kernels: PTX accesses and registers (compiled for the target, no GPU)",
        "",
        ("How to read it: widths are the bits one thread moves per global access instruction; "
         "128 (`v4.b32`, `v2.b64`) is the widest access a thread can issue, so a streaming kernel should show "
         "only 128 on its x / grad / x_nat / eps streams (a (1,C,1,1) eps is a per-element gather: 32; a "
         "(B,1,H,W) eps keeps 128 because its inner H×W run is contiguous). Registers are "
         "ptxas' allocation per thread (from the cubin); spill = local memory bytes, 0 means no spills. "
         "`pgd_step_*` are compiled for a 128×3×32×32 batch; rows marked † are extra variants this section "
         "adds (bf16 tensors with the float32 eps map cam_eps_map makes, and a (B,1,H,W) eps)."),
        "",
        "| kernel | arch | regs | spill B | shared B | load bits | store bits | PTX loads | PTX stores |",
        "|---|---|---:|---:|---:|---|---|---|---|",
    ]
    extra = set(EXTRA_TRITON_VARIANTS)
    for r in sorted(result["ptx"], key=lambda r: (r["name"] in extra, r["name"], r["arch"])):
        name = r["name"] + (" †" if r["name"] in extra else "")
        if "error" in r:
            lines.append(f"| {name} | sm_{r['arch']} | compile failed: {r['error'][:80]} | | | | | | |")
            continue
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
    a = result["assumptions"]
    lines += [
        "",
        "### 4.3 Projected H100 time from the bytes each op must move",
        "",
        (f"Assumptions: H100 SXM HBM3, ~{a['hbm_peak_tb_s']} TB/s peak, **{a['hbm_achievable_tb_s']} TB/s** "
         f"achievable by a streaming kernel (used below); **{a['launch_us']} µs per kernel launch** as a latency "
         "floor (a stated assumption, not a measurement). Bytes = every input read once + every output written "
         "once (pgd_step_: x_adv read + written, grad, x_nat, eps; project_: no grad); eps is float32 for bf16 "
         "tensors too (cam_eps_map makes it float32). Projected = Σ over the kernels of max(kernel bytes / "
         f"{a['hbm_achievable_tb_s']} TB/s, {a['launch_us']} µs): the fused ops are 1 kernel; the release chain "
         "(reference.pgd_step_release) is tallied op by op on meta tensors at full size, each eager op reading "
         "its full-size inputs and writing its output (bool masks 1 B/element; with a float32 eps the bf16 chain "
         "is promoted to float32 from the first `where` on). "
         "How to read it: at CIFAR size every fused op sits on the launch floor (memory alone would take "
         "≈ 1-3 µs), and the release chain pays the floor once per eager op; at ImageNet-like size both are "
         "memory-bound and the ratio is the ratio of bytes. H100's 50 MB L2 holds a whole CIFAR step, so "
         "small-size memory times are upper bounds."),
        "",
        ("| size | dtype | eps | pgd_step_ MB | µs (mem) | projected µs | project_ MB | projected µs "
         "| release kernels | release MB | µs (mem) | projected µs | release ÷ fused |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    index = {(r["size"], r.get("dtype"), r.get("eps"), r["op"], r["impl"]): r for r in result["projections"]}
    for size_name, shape, _ in SIZES:
        for dtype_name in DTYPES:
            for form in EPS_FORMS:
                key = (size_name, dtype_name, form)
                step, proj, rel = (index[key + k] for k in (("pgd_step_", "fused"), ("project_", "fused"),
                                                             ("pgd_step_", "release")))
                lines.append(
                    f"| {size_name} {'×'.join(map(str, shape))} | {dtype_name} | {form} | {step['bytes'] / 1e6:.2f} | "
                    f"{step['memory_us']:.1f} | {step['projected_us']:.1f} | {proj['bytes'] / 1e6:.2f} | "
                    f"{proj['projected_us']:.1f} | {rel['launches']} | {rel['bytes'] / 1e6:.1f} | "
                    f"{rel['memory_us']:.1f} | {rel['projected_us']:.1f} | "
                    f"{rel['projected_us'] / step['projected_us']:.1f}× |"
                )
    lines += [
        "",
        ("cam_eps_map: memory floor only (CAM read + budget written, float32). The op is compute-bound (float64 "
         "PIL resize and z-score per pixel), so its real time is above this; the figure says the memory side "
         "costs nothing."),
        "",
        "| size | mode | CAM | output | MB | µs (mem) | projected µs |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in result["projections"]:
        if r["op"] == "cam_eps_map":
            lines.append(
                f"| {r['size']} | {r['mode']} | {'×'.join(map(str, r['cam_shape']))} | "
                f"{'×'.join(map(str, r['out_shape']))} | {r['bytes'] / 1e6:.3f} | {r['memory_us']:.2f} | "
                f"{r['projected_us']:.1f} |"
            )
    if not all(result.get("projection_checks", {}).values()):
        lines.append(f"\nWarning: the meta-tensor tally and the CPU op sequence differ: {result['projection_checks']}")
    # ---- 4.4
    lines += [
        "",
        "### 4.4 Kernel launches per call",
        "",
        ("How to read it: aten ops dispatched by one call on small CPU tensors, counted with a "
         "TorchDispatchMode (bench.common.kernels_per_call; views such as `detach` excluded). On a GPU "
         "each is at least one kernel launch, so the count × "
         f"{LAUNCH_US} µs is a latency floor. `ours` runs with the compiled cpu backend forced; the cuda and "
         "triton backends launch the same single kernel per call (one `<<<…>>>` / one Triton launch)."),
        "",
        "| op | impl | eps / mode | launches | floor µs | ops |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in result["launches"]:
        lines.append(f"| {r['op']} | {r['impl']} | {r['variant']} | {r['launches']} | {r['launch_floor_us']:.1f} | "
                     f"{_ops_text(r['ops'])} |")
    lines += [f"Note: {n}" for n in result.get("launch_notes", [])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- run
def run(quick: bool = False, log=print) -> dict:
    """{"ptx": [...], "cuda_kernels": [...], "projections": [...], "launches": [...], "markdown": str}, plus
    "assumptions", "cuda_status", notes and per-part "timings_s". quick: Triton for sm_90 only and without
    the extra bf16 / (B,1,H,W) variants (Triton compilation is most of the run time)."""
    timings, result = {}, {"assumptions": ASSUMPTIONS, "quick": quick}
    parts = (  # (name, progress line, the result's keys for its two outputs, the part)
        ("ptx", "4.1 Triton PTX ...", ("ptx", "ptx_notes"),
         lambda: triton_ptx((90,) if quick else ARCHS, extra_variants=not quick, log=log)),
        ("cuda_kernels", "4.2 CUDA kernels ...", ("cuda_kernels", "cuda_status"), lambda: cuda_kernels(log=log)),
        ("projections", "4.3 projections ...", ("projections", "projection_checks"), lambda: projections(log=log)),
        ("launches", "4.4 launches ...", ("launches", "launch_notes"), lambda: launches(log=log)),
    )
    t0 = time.perf_counter()
    for name, progress, (rows_key, notes_key), part in parts:
        t = time.perf_counter()
        log(progress)
        result[rows_key], result[notes_key] = part()
        timings[name] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    result["timings_s"] = timings
    result["markdown"] = markdown(result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Triton for sm_90 only, no extra variants")
    parser.add_argument("--out", help="also write the whole result (rows, notes, timings, markdown) as JSON here")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(result["markdown"])
    print(f"\n(section 4 took {result['timings_s']['total']:.1f} s)", file=sys.stderr)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
