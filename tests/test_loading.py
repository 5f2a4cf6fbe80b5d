"""How the compiled kernels load (part_fast.backends._load_compiled): torch's version is checked before any
compiled library is loaded, a library that cannot load is reported once in one line naming the cause,
what runs instead and the fix, and a CUDA part that cannot load leaves the CPU kernels working. Also the
errors of direct torch.ops.part_fast.* calls, which the stable ABI raises as ValueError."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from part_fast import backends, ops, reference

LOAD = """
import importlib.abc, json, sys, warnings
import torch
{prelude}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import part_fast
    from part_fast import ops, reference
    g = torch.Generator().manual_seed(0)
    x, grad, x_nat = (torch.rand(2, 3, 5, 4, generator=g) for _ in range(3))
    got = part_fast.pgd_step_(x.clone(), grad, x_nat, 0.03, 0.01)
    same = torch.equal(got, reference.pgd_step_(x.clone(), grad, x_nat, 0.03, 0.01))
print("RESULT" + json.dumps({{
    "warnings": [(w.category.__name__, str(w.message)) for w in caught if "part_fast" in str(w.message)],
    "loaded": sorted(m for m in sys.modules if m.startswith("part_fast._C")),
    "extension_error": repr(ops.EXTENSION_ERROR),
    "cuda_extension_error": repr(ops.CUDA_EXTENSION_ERROR),
    "selected": ops.select_backend(torch.device("cpu")),
    "same_as_reference": same,
}}))
"""

BLOCK = """
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {name!r}:
            raise OSError({message!r})
        return None
sys.meta_path.insert(0, Block())
"""


def _run(prelude: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PART_FAST_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD.format(prelude=prelude))], check=False,
                          env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT"):])


def _needs_extension():
    if ops.EXTENSION_ERROR is not None:
        pytest.skip(f"needs the compiled kernels part_fast._C ({ops.EXTENSION_ERROR!r})")


def test_torch_version_parsing():
    assert backends._torch_version("2.13.0+cpu") == (2, 13)
    assert backends._torch_version("2.9.1") == (2, 9)
    assert backends._torch_version("2.15.0.dev20260101+cu130") == (2, 15)
    assert backends._torch_version("3.0.0a0") == (3, 0)
    assert backends._torch_version("2.10.0rc1") == (2, 10)


def test_torch_older_than_the_floor_loads_nothing_and_says_so_in_one_line():
    """An older torch lacks the stable ABI's entry points: no compiled library is even opened."""
    r = _run('torch.__version__ = "2.9.1"')
    assert r["loaded"] == []
    assert len(r["warnings"]) == 1, r["warnings"]
    category, message = r["warnings"][0]
    assert category == "RuntimeWarning" and "\n" not in message
    for words in ("torch>=2.10", "2.9.1", "Triton", "reference", "upgrade torch"):
        assert words in message, (words, message)
    assert "older than 2.10" in r["extension_error"] and r["cuda_extension_error"] == r["extension_error"]
    assert r["selected"] == "reference" and r["same_as_reference"]


def test_a_cuda_part_that_cannot_load_leaves_the_cpu_kernels_working():
    _needs_extension()
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} has no CUDA: part_fast._C_cuda is never loaded here "
                    "(test_a_cpu_only_torch_never_loads_the_cuda_part covers this torch)")
    missing = "libcudart.so.99: cannot open shared object file: No such file or directory"
    r = _run(BLOCK.format(name="part_fast._C_cuda", message=missing))
    assert r["loaded"] == ["part_fast._C"]
    assert len(r["warnings"]) == 1, r["warnings"]
    category, message = r["warnings"][0]
    assert category == "RuntimeWarning" and "\n" not in message
    for words in ("part_fast._C_cuda", "libcudart.so.99", "CPU kernels are unaffected", "Triton", f"CUDA {torch.version.cuda}"):
        assert words in message, (words, message)
    assert r["extension_error"] == "None" and "libcudart.so.99" in r["cuda_extension_error"]
    assert r["selected"] == "cpu" and r["same_as_reference"]


def test_a_cpu_only_torch_never_loads_the_cuda_part():
    _needs_extension()
    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} is a CUDA build (test_a_cuda_part_that_cannot_load_... covers it)")
    r = _run("")
    assert r["loaded"] == ["part_fast._C"] and r["warnings"] == []
    assert r["selected"] == "cpu" and r["same_as_reference"]


def test_the_compiled_kernels_load_quietly():
    _needs_extension()
    r = _run("")
    assert r["warnings"] == [] and r["extension_error"] == "None"
    assert r["loaded"][0] == "part_fast._C" and r["selected"] == "cpu" and r["same_as_reference"]


def test_a_failed_load_is_one_line_whatever_the_exception_says():
    r = _run(BLOCK.format(name="part_fast._C", message="first line\nsecond line\n  third"))
    assert len(r["warnings"]) == 1 and "\n" not in r["warnings"][0][1]
    assert "OSError: first line second line third" in r["warnings"][0][1]
    assert r["selected"] == "reference" and r["same_as_reference"]


# ------------------------------------------------------------------- errors of direct torch.ops calls
def _direct_calls():
    x = torch.rand(2, 3, 4, 4)
    cam = torch.rand(2, 3, 3)
    op = torch.ops.part_fast
    return [  # (argument named, call)
        ("x_adv", lambda: op.pgd_step_(x[0].clone(), x[0], x[0], None, 0.1, 0.1, 0.0, 1.0)),
        ("x_adv", lambda: op.pgd_step_(x.clone().long(), x, x, None, 0.1, 0.1, 0.0, 1.0)),
        ("grad", lambda: op.pgd_step_(x.clone(), x.double(), x, None, 0.1, 0.1, 0.0, 1.0)),
        ("x_nat", lambda: op.project_(x.clone(), x[:1], None, 0.1, 0.0, 1.0)),
        ("eps", lambda: op.project_(x.clone(), x, torch.rand(3, 4), 0.1, 0.0, 1.0)),
        ("eps", lambda: op.project_(x.clone(), x, None, -0.1, 0.0, 1.0)),
        ("step_size", lambda: op.pgd_step_(x.clone(), x, x, None, 0.1, -1.0, 0.0, 1.0)),
        ("lo", lambda: op.project_(x.clone(), x, None, 0.1, 1.0, 0.0)),
        ("cam", lambda: op.cam_eps_map(cam[0], [4, 4], 0.1, 0.05, "jet")),
        ("size", lambda: op.cam_eps_map(cam, [0, 4], 0.1, 0.05, "jet")),
        ("eps_low", lambda: op.cam_eps_map(cam, [4, 4], 0.1, 0.5, "jet")),
        ("mode", lambda: op.cam_eps_map(cam, [4, 4], 0.1, 0.05, "rgb")),
    ]


@pytest.mark.parametrize("index", range(12))
def test_direct_op_calls_refuse_bad_input_naming_the_argument(index):
    """torch.ops.part_fast.* bypasses the Python checks: the kernels' own checks raise ValueError (the
    stable ABI's std::invalid_argument) naming the argument, and leave x_adv untouched."""
    _needs_extension()
    argument, call = _direct_calls()[index]
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call()


def test_wrapper_raises_type_error_for_dtypes_before_the_kernel():
    _needs_extension()
    x = torch.rand(2, 3, 4, 4)
    with ops.use_backend("cpu"):
        with pytest.raises(TypeError, match="^grad must have x_adv's dtype float32, got float64"):
            ops.pgd_step_(x.clone(), x.double(), x, 0.1, 0.1)
        with pytest.raises(TypeError, match="^eps must be a float32 tensor or have x_adv's dtype"):
            ops.project_(x.clone(), x, torch.rand(1, 3, 1, 1).double())
        with pytest.raises(TypeError, match="^cam must be a floating-point tensor"):
            ops.cam_eps_map(torch.ones(2, 3, 3, dtype=torch.int64), 4, 0.1, 0.05)
        # and a correct call is untouched by the check
        got = ops.pgd_step_(x.clone(), x, x, 0.1, 0.1)
    assert torch.equal(got, reference.pgd_step_(x.clone(), x, x, 0.1, 0.1))
