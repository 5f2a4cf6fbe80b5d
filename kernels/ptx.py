"""Compile every part_fast Triton kernel for an NVIDIA target without a GPU, and report what the code does
with memory: global load/store widths (128-bit accesses are the point of the streaming kernel), registers,
spills, shared memory. The benchmark harness's GPU evidence (bench/gpu_evidence.py) shows these rows.

    python -m part_fast.kernels.ptx --arch 90                        # JSON on stdout
    python -m part_fast.kernels.ptx --arch 90 --training-variants    # also the variants training launches

triton.compile needs real JITFunctions: under TRITON_INTERPRET=1, `triton.jit` returns interpreter
wrappers instead, so compile_kernels() then re-runs this module in a subprocess without that variable.
The argument attributes below are what Triton's launcher derives at run time for 16-byte aligned tensors
and sizes divisible by 16 (tt.divisibility = 16); without them no vector access can be proven safe.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

from . import cam_eps_map as cam_eps_map_module
from . import pgd_step as pgd_step_module

_DIVISIBLE_16 = [["tt.divisibility", 16]]
_GLOBAL_ACCESS = re.compile(r"\b((?:ld|st)\.global[\w.:]*)")
_PTX_REG_DECL = re.compile(r"\.reg\s+\.(\w+)\s+%\w+<(\d+)>;")
_TRITON_DTYPE = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64", torch.int16: "i16"
}


def _specialize(fn, args, constexprs):
    """(signature, constexprs, attrs) for triton.compile, as Triton's launcher specializes a call with
    these arguments: tensors are 16-byte aligned pointers (torch's allocations are), an int equal to 1
    becomes a constant, an int divisible by 16 gets tt.divisibility 16, a float is fp32, annotated
    parameters keep their annotation."""
    runtime_params = [p for p in fn.params if not p.is_constexpr]
    assert len(runtime_params) == len(args), ([p.name for p in runtime_params], len(args))
    values = dict(zip((p.name for p in runtime_params), args))
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPE[value.dtype]
            attrs[(index,)] = _DIVISIBLE_16
        elif param.annotation_type:
            signature[name] = param.annotation_type
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = _DIVISIBLE_16
    return signature, constants, attrs


def _pgd_step_spec(name, dtype, eps_shape, has_grad=True):
    """pgd_step_kernel as pgd_step_ launches it for a CIFAR batch (128, 3, 32, 32) of `dtype`, with a
    float eps (eps_shape None) or an eps tensor of eps_shape in that dtype."""
    x = torch.empty((128, 3, 32, 32), dtype=dtype, device="meta")
    eps = 8 / 255 if eps_shape is None else torch.empty(eps_shape, dtype=dtype, device="meta")
    _, args, constexprs = pgd_step_module.launch_args(x, x if has_grad else None, x, eps, 2 / 255, 0.0, 1.0)
    return dict(name=name, fn=pgd_step_module.pgd_step_kernel, args=args, constexprs=constexprs,
                options={"num_warps": pgd_step_module.NUM_WARPS})


def _cam_eps_map_spec(name, mode, h, w, H, W):
    """cam_eps_map_kernel as cam_eps_map launches it for 128 float32 CAMs of (h, w) resized to (H, W)."""
    cam = torch.empty((128, h, w), dtype=torch.float32, device="meta")
    out = torch.empty((128, 3 if mode == "jet" else 1, H, W), dtype=torch.float32, device="meta")
    _, args, constexprs = cam_eps_map_module.launch_args(cam, out, 8 / 255, 7 / 255, mode)
    return dict(name=name, fn=cam_eps_map_module.cam_eps_map_kernel, args=args, constexprs=constexprs,
                options={"num_warps": cam_eps_map_module.NUM_WARPS, **cam_eps_map_module.COMPILE_OPTIONS})


def kernel_specs():
    """Every kernel variant worth inspecting: the streaming PGD step with a float eps and a dense eps map
    (the two that must stream at full width), bf16, project-only and a broadcast (1, C, 1, 1) eps; and
    cam_eps_map in both modes, one tile (CIFAR: 4x4 -> 32x32) and tiled (ImageNet: 7x7 -> 224x224)."""
    dense = (128, 3, 32, 32)
    return [
        _pgd_step_spec("pgd_step_fp32_eps_scalar", torch.float32, None),
        _pgd_step_spec("pgd_step_fp32_eps_dense", torch.float32, dense),
        _pgd_step_spec("pgd_step_bf16_eps_scalar", torch.bfloat16, None),
        _pgd_step_spec("pgd_step_bf16_eps_dense", torch.bfloat16, dense),
        _pgd_step_spec("project_fp32_eps_scalar", torch.float32, None, has_grad=False),
        _pgd_step_spec("project_fp32_eps_dense", torch.float32, dense, has_grad=False),
        _pgd_step_spec("pgd_step_fp32_eps_strided_1c11", torch.float32, (1, 3, 1, 1)),
        _cam_eps_map_spec("cam_eps_map_jet_4x4_to_32x32", "jet", 4, 4, 32, 32),
        _cam_eps_map_spec("cam_eps_map_cam_4x4_to_32x32", "cam", 4, 4, 32, 32),
        _cam_eps_map_spec("cam_eps_map_jet_7x7_to_224x224", "jet", 7, 7, 224, 224),
    ]


TRAINING_VARIANTS = ("pgd_step_bf16_eps_dense_f32", "pgd_step_bf16_eps_b1hw_f32", "pgd_step_fp32_eps_b1hw")


def training_variant_specs():
    """pgd_step_kernel variants kernel_specs() does not list but training launches: bf16 tensors with the
    float32 eps map cam_eps_map produces (dense and channel-shared), and a float32 (B,1,H,W) eps."""
    shape = (128, 3, 32, 32)
    x32 = torch.empty(shape, dtype=torch.float32, device="meta")
    x16 = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    dense = torch.empty(shape, dtype=torch.float32, device="meta")
    shared = torch.empty((128, 1, 32, 32), dtype=torch.float32, device="meta")
    operands = dict(zip(TRAINING_VARIANTS, ((x16, dense), (x16, shared), (x32, shared))))
    specs = []
    for name, (x, eps) in operands.items():
        _, args, constexprs = pgd_step_module.launch_args(x, x, x, eps, 2 / 255, 0.0, 1.0)
        specs.append(dict(name=name, fn=pgd_step_module.pgd_step_kernel, args=args, constexprs=constexprs,
                          options={"num_warps": pgd_step_module.NUM_WARPS}))
    return specs


def access_bits(access: str) -> int | None:
    """Bits one thread moves with a PTX access, e.g. ld.global.v4.b32 -> 128, ld.global.b64 -> 64 (None when
    the instruction names no element width)."""
    vec = re.search(r"\.v(\d+)\.", access)
    elem = re.findall(r"\.[bfsu](\d+)\b", access)
    if not elem:
        return None
    return (int(vec.group(1)) if vec else 1) * int(elem[-1])


def _resource_usage(cubin: bytes | None) -> dict | None:
    """{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..} of the kernel in a cubin, from the cuobjdump
    Triton ships (what ptxas allocated), or None when it cannot be run."""
    if not cubin:
        return None
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                                  capture_output=True, text=True).stdout
    except Exception:  # noqa: BLE001  no cuobjdump, or one that cannot read this cubin: the PTX count is used
        return None
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return usage if "REG" in usage else None


def _compile_one(spec, arch: int) -> dict:
    signature, constexprs, attrs = _specialize(spec["fn"], spec["args"], spec["constexprs"])
    source = triton.compiler.ASTSource(fn=spec["fn"], signature=signature, constexprs=constexprs, attrs=attrs)
    target = triton.backends.compiler.GPUTarget("cuda", arch, 32)
    compiled = triton.compile(source, target=target, options=spec["options"])
    ptx = compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm.get("cubin"))
    if usage is not None:
        registers, local_bytes, registers_source = usage["REG"], usage["LOCAL"], "cuobjdump -res-usage (cubin)"
    else:
        registers = sum(int(n) for kind, n in _PTX_REG_DECL.findall(ptx) if kind != "pred")
        local_bytes, registers_source = None, "ptx .reg declarations (virtual registers, not the allocation)"
    accesses = sorted(set(_GLOBAL_ACCESS.findall(ptx)))
    loads = [a for a in accesses if a.startswith("ld.")]
    stores = [a for a in accesses if a.startswith("st.")]
    return {
        "name": spec["name"],
        "arch": arch,
        "registers": registers,
        "registers_source": registers_source,
        "local_bytes": local_bytes,  # spills / stack: 0 means none
        "global_loads": loads,
        "global_stores": stores,
        "load_bits": sorted({access_bits(a) for a in loads} - {None}),
        "store_bits": sorted({access_bits(a) for a in stores} - {None}),
        "shared_bytes": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "fp64_fma": "fma.rn.f64" in ptx,  # must be False for cam_eps_map (PIL sums without contraction)
        "ptx_lines": ptx.count("\n"),
    }


def _compile_in_subprocess(arch: int, training_variants: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    module = __spec__.name if __spec__ is not None else __name__
    command = [sys.executable, "-m", module, "--arch", str(arch)] + (["--training-variants"] if training_variants else [])
    result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def compile_kernels(arch: int, training_variants: bool = False) -> list[dict]:
    """Compile every kernel of kernel_specs() for sm_<arch>, without a GPU.

    Args:
        arch: the compute capability, e.g. 80 or 90.
        training_variants: also compile training_variant_specs() (the bf16 / (B,1,H,W) eps variants).

    Returns:
        One dict per kernel: name, arch, registers and where the count comes from, local (spill) bytes, the
        global load / store instructions found in the PTX (e.g. "ld.global.v4.b32") and their widths in bits,
        shared memory bytes, num_warps, whether float64 FMA appears, PTX length.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_subprocess(arch, training_variants)
    specs = kernel_specs() + (training_variant_specs() if training_variants else [])
    return [_compile_one(spec, arch) for spec in specs]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90 (repeatable)")
    parser.add_argument("--training-variants", action="store_true",
                        help="also the pgd_step variants training launches (bf16 with a float32 eps, (B,1,H,W) eps)")
    args = parser.parse_args(argv)
    results = []
    for arch in args.arch or [90]:
        results += compile_kernels(arch, args.training_variants)
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
