"""Backend discovery and selection: available_backends(), the default choice, use_backend(),
PART_FAST_BACKEND, and the pure-PyTorch fallback when the compiled extension cannot be loaded."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ALL_BACKENDS, BACKENDS, attack_inputs, rand
from part_fast import ops, reference

EXTENSION_LOADED = ops.EXTENSION_ERROR is None


class RecordOps(TorchDispatchMode):
    """Records the name of every aten / custom op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs(gen):
    x_adv, grad, x_nat = attack_inputs((2, 3, 8, 8), torch.float32, "contiguous", gen)
    cam = rand((2, 4, 4), gen)
    return x_adv, grad, x_nat, cam


def _run_all(x_adv, grad, x_nat, cam):
    eps = ops.cam_eps_map(cam, (8, 8), 8 / 255, 7 / 255)
    a = ops.pgd_step_(x_adv.clone(), grad, x_nat, eps, 2 / 255)
    b = ops.project_(x_adv.clone(), x_nat, eps)
    return eps, a, b


# ------------------------------------------------------------------------------------ discovery
def test_available_backends_lists_usable_backends():
    assert ops.BACKENDS == ("reference", "cpu", "cuda", "triton")
    cpu = ops.available_backends("cpu")
    assert cpu[0] == "reference"
    assert cpu == [b for b in ops.BACKENDS if b in cpu], "listed in BACKENDS order"
    assert ("cpu" in cpu) == EXTENSION_LOADED
    assert "cuda" not in cpu
    assert ops.available_backends(torch.device("cpu")) == cpu
    assert set(cpu) <= set(ops.available_backends())
    assert ops.available_backends("meta") == ["reference"]
    if not torch.cuda.is_available():
        assert "cuda" not in ops.available_backends()


def test_extension_loaded_in_this_environment():
    """The package is installed with its extension here: a missing one must not go unnoticed."""
    assert EXTENSION_LOADED, f"part_fast._C failed to load: {ops.EXTENSION_ERROR!r}"
    assert "cpu" in BACKENDS
    for name in ("pgd_step_", "project_", "cam_eps_map"):
        assert hasattr(torch.ops.part_fast, name)


def test_triton_listed_only_when_interpreted_on_cpu():
    kernels = ops._triton_kernels()
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1"
    assert ("triton" in ops.available_backends("cpu")) == (kernels is not None)


def test_default_backend_is_the_compiled_one():
    expected = "cpu" if EXTENSION_LOADED else "reference"
    assert ops.select_backend(torch.device("cpu")) == expected
    # interpreted Triton is never chosen by default
    assert ops.select_backend(torch.device("meta")) == "reference"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_default_and_forced_give_same_results(backend, gen):
    x_adv, grad, x_nat, cam = _inputs(gen)
    auto = _run_all(x_adv, grad, x_nat, cam)
    with ops.use_backend(backend):
        forced = _run_all(x_adv, grad, x_nat, cam)
    for a, b in zip(auto, forced):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- use_backend
@pytest.mark.skipif(not EXTENSION_LOADED, reason="needs the compiled extension")
def test_use_backend_routes_the_call(gen):
    x_adv, grad, x_nat, cam = _inputs(gen)
    with ops.use_backend("cpu"), RecordOps() as rec:
        _run_all(x_adv, grad, x_nat, cam)
    names = set(rec.names)
    assert {"part_fast.cam_eps_map.default", "part_fast.pgd_step_.default", "part_fast.project_.default"} <= names
    with ops.use_backend("reference"), RecordOps() as rec:
        _run_all(x_adv, grad, x_nat, cam)
    assert not any(n.startswith("part_fast.") for n in rec.names)
    assert rec.names, "the reference runs aten ops"


@pytest.mark.skipif("triton" not in BACKENDS, reason="part_fast.kernels (Triton) is not importable")
def test_use_backend_triton_routes_to_kernels(monkeypatch, gen):
    kernels = ops._triton_kernels()
    calls = []
    real_step, real_cam = kernels.pgd_step.pgd_step_, kernels.cam_eps_map.cam_eps_map

    def step_spy(*a, **k):
        calls.append("pgd_step")
        return real_step(*a, **k)

    def cam_spy(*a, **k):
        calls.append("cam_eps_map")
        return real_cam(*a, **k)

    monkeypatch.setattr(kernels.pgd_step, "pgd_step_", step_spy)
    monkeypatch.setattr(kernels.cam_eps_map, "cam_eps_map", cam_spy)
    x_adv, grad, x_nat, cam = _inputs(gen)
    with ops.use_backend("triton"), RecordOps() as rec:
        _run_all(x_adv, grad, x_nat, cam)
    assert calls == ["cam_eps_map", "pgd_step", "pgd_step"]
    assert not any(n.startswith("part_fast.") for n in rec.names)


def test_use_backend_unknown_name_is_value_error():
    with pytest.raises(ValueError, match="backend"):
        with ops.use_backend("tpu"):
            pass
    with pytest.raises(ValueError):
        with ops.use_backend("CPU"):
            pass
    assert ops._forced_backend is None


@pytest.mark.parametrize("name", ["cuda"] + [b for b in ("cpu", "triton") if b not in ALL_BACKENDS])
def test_use_backend_unusable_is_runtime_error(name, gen):
    """A forced backend that cannot run these tensors raises; it never falls back silently."""
    x_adv, grad, x_nat, cam = _inputs(gen)
    before = x_adv.clone()
    with ops.use_backend(name):
        with pytest.raises(RuntimeError, match=name):
            ops.pgd_step_(x_adv, grad, x_nat, 0.03, 0.01)
        with pytest.raises(RuntimeError, match=name):
            ops.project_(x_adv, x_nat, 0.03)
        with pytest.raises(RuntimeError, match=name):
            ops.cam_eps_map(cam, 32, 0.03, 0.02)
    assert torch.equal(x_adv, before)


@pytest.mark.skipif(not EXTENSION_LOADED, reason="needs the compiled extension")
def test_use_backend_cpu_on_meta_tensors_is_runtime_error():
    x = torch.empty((1, 3, 4, 4), device="meta")
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="cpu"):
        ops.project_(x, x, 0.03)


def test_use_backend_nests_and_restores():
    device = torch.device("cpu")
    auto = ops.select_backend(device)
    with ops.use_backend("reference"):
        assert ops.select_backend(device) == "reference"
        with ops.use_backend(None):
            assert ops.select_backend(device) == auto
        assert ops.select_backend(device) == "reference"
    assert ops.select_backend(device) == auto
    with pytest.raises(KeyError):
        with ops.use_backend("reference"):
            raise KeyError("boom")
    assert ops.select_backend(device) == auto
    assert ops._forced_backend is None


# --------------------------------------------------------------------------- subprocess checks
def _python(code, env_extra=None, drop=("PART_FAST_BACKEND",), timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


PROBE = """
import json, torch
from part_fast import ops
x = torch.rand(2, 3, 4, 4); g = torch.randn(2, 3, 4, 4)
result = {"available": ops.available_backends("cpu"), "selected": None}
try:
    result["selected"] = ops.select_backend(torch.device("cpu"))
    ops.pgd_step_(x.clone(), g, x, 0.03, 0.01)
    ops.cam_eps_map(torch.rand(2, 4, 4), 8, 0.03, 0.02)
    result["error"] = None
except Exception as e:
    result["error"] = type(e).__name__
    result["message"] = str(e)
print("RESULT" + json.dumps(result))
"""


def _result(proc):
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("name", ["reference", "cpu", "cuda", "triton", ""])
def test_env_var_forces_backend(name):
    proc = _python(PROBE, {"PART_FAST_BACKEND": name, "TRITON_INTERPRET": "1"})
    r = _result(proc)
    if name == "":  # empty means unset: automatic choice
        assert r["selected"] == ("cpu" if EXTENSION_LOADED else "reference") and r["error"] is None
    elif name in r["available"]:
        assert r["selected"] == name and r["error"] is None
    else:
        assert r["error"] == "RuntimeError" and name in r["message"]
    if name == "cuda":
        assert r["error"] == "RuntimeError"


def test_env_var_unknown_backend_is_value_error():
    proc = _python("import part_fast", {"PART_FAST_BACKEND": "fastest"})
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "PART_FAST_BACKEND" in proc.stderr and "fastest" in proc.stderr


def test_env_var_triton_without_interpreter_is_runtime_error():
    """Triton on CPU tensors only runs interpreted: forcing it without TRITON_INTERPRET=1 must raise."""
    proc = _python(PROBE, {"PART_FAST_BACKEND": "triton"}, drop=("PART_FAST_BACKEND", "TRITON_INTERPRET"))
    r = _result(proc)
    assert "triton" not in r["available"]
    assert r["error"] == "RuntimeError" and "triton" in r["message"]


MISSING_EXTENSION = """
import importlib, importlib.abc, json, sys, warnings
BLOCK = {block!r}
if BLOCK == "none":
    sys.modules["part_fast._C"] = None  # `from . import _C` raises ImportError
else:
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "part_fast._C":
                raise OSError("libc10_missing.so: cannot open shared object file: No such file or directory")
            return None
    sys.meta_path.insert(0, Block())

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import part_fast
    import part_fast.ops
    from part_fast import ops, reference
    importlib.import_module("part_fast.ops")
    import torch
    inputs = torch.load(sys.argv[1])
    eps = part_fast.cam_eps_map(inputs["cam"], (8, 8), 8 / 255, 7 / 255)
    eps_cam = part_fast.cam_eps_map(inputs["cam"], (8, 8), 8 / 255, 7 / 255, mode="cam")
    x1 = part_fast.pgd_step_(inputs["x_adv"].clone(), inputs["grad"], inputs["x_nat"], eps, 2 / 255)
    x2 = part_fast.project_(inputs["x_adv"].clone(), inputs["x_nat"], eps_cam)
    torch.save({{"eps": eps, "eps_cam": eps_cam, "x1": x1, "x2": x2}}, sys.argv[2])
result = {{
    "warnings": [(w.category.__name__, str(w.message)) for w in caught if "part_fast" in str(w.message)],
    "available": ops.available_backends("cpu"),
    "selected": ops.select_backend(torch.device("cpu")),
    "error_type": type(ops.EXTENSION_ERROR).__name__,
    "has_op": hasattr(torch.ops.part_fast, "pgd_step_"),
}}
try:
    with ops.use_backend("cpu"):
        part_fast.project_(inputs["x_adv"].clone(), inputs["x_nat"], 0.03)
    result["forced_cpu"] = None
except RuntimeError as e:
    result["forced_cpu"] = "RuntimeError"
print("RESULT" + json.dumps(result))
"""


@pytest.mark.parametrize("block", ["none", "oserror"])
def test_missing_extension_falls_back_to_reference(block, tmp_path, gen):
    """`import part_fast` without a loadable part_fast._C works on the reference and warns once, naming the
    cause; forcing the compiled backend then raises."""
    x_adv, grad, x_nat, cam = _inputs(gen)
    torch.save({"x_adv": x_adv, "grad": grad, "x_nat": x_nat, "cam": cam}, tmp_path / "in.pt")
    code = MISSING_EXTENSION.format(block=block)
    env = {k: v for k, v in os.environ.items() if k not in ("PART_FAST_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=240)
    r = _result(proc)
    assert len(r["warnings"]) == 1, r["warnings"]
    category, message = r["warnings"][0]
    assert category == "RuntimeWarning"
    assert "part_fast._C" in message and "reference" in message
    if block == "none":
        assert r["error_type"] in ("ImportError", "ModuleNotFoundError") and "None in sys.modules" in message
    else:
        assert r["error_type"] == "OSError" and "libc10_missing.so" in message
    assert r["available"] == ["reference"] and r["selected"] == "reference"
    assert r["has_op"] is False
    assert r["forced_cpu"] == "RuntimeError"

    out = torch.load(tmp_path / "out.pt")
    eps = reference.cam_eps_map(cam, (8, 8), 8 / 255, 7 / 255)
    eps_cam = reference.cam_eps_map(cam, (8, 8), 8 / 255, 7 / 255, mode="cam")
    assert torch.equal(out["eps"], eps) and torch.equal(out["eps_cam"], eps_cam)
    assert torch.equal(out["x1"], reference.pgd_step_(x_adv.clone(), grad, x_nat, eps, 2 / 255))
    assert torch.equal(out["x2"], reference.project_(x_adv.clone(), x_nat, eps_cam))


def test_missing_extension_warns_once_with_default_filters():
    """With Python's default warning filters the fallback is reported once on stderr, however often the
    ops run."""
    code = """
    import sys
    sys.modules["part_fast._C"] = None
    import torch, part_fast
    for _ in range(3):
        part_fast.project_(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), 0.03)
        import part_fast.ops
    """
    proc = _python(code, drop=("PART_FAST_BACKEND", "TRITON_INTERPRET", "PYTHONWARNINGS"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("could not be loaded") == 1, proc.stderr
    assert "RuntimeWarning" in proc.stderr
