"""The CUDA kernels of the built extension (part_fast/_C_cuda*.so), read without a GPU: registers, stack
frame, local memory and static shared memory per kernel (`cuobjdump --dump-resource-usage`), and from the
SASS (`cuobjdump -sass`) the spill stores / loads (STL / LDL instructions) and the widths of the global
accesses (LDG / STG). Section 4 of the benchmark harness (bench/gpu_evidence.py) shows the rows.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)


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
    """EpsPlan::Kind value -> name, read from csrc/validate.h when the source tree is here."""
    names = {}
    header = Path(__file__).resolve().parents[1] / "csrc" / "validate.h"
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
    """Bits one thread moves with a SASS global access, e.g. LDG.E.128 -> 128, STG.E.U16 -> 16 (32 unless
    the opcode names another width)."""
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


def cuda_kernels() -> tuple[list[dict], str]:
    """The built extension's CUDA kernels, read with cuobjdump.

    Returns:
        (rows, status): one row per kernel and arch (readable and mangled name, registers, stack / local /
        static shared bytes, spill instructions, global access opcodes and their widths); status says what
        was read, or why there are no rows (no extension, a CPU-only build, no cuobjdump).
    """
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
    logger.info("  cuda: %s", status)
    return rows, status
