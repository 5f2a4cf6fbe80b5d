"""Backend discovery and selection: available_backends(), the default choice, use_backend() (per thread
and task), PART_FAST_BACKEND, the dtypes each backend takes, and the fallbacks when the compiled extension
or the Triton kernels cannot be loaded.

Also run for a build without the extension (PART_FAST_NO_EXTENSION=1): what needs it skips, saying so."""
import asyncio
import importlib.abc
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import part_fast
from helpers import ALL_BACKENDS, BACKENDS, CPU_DTYPES, DTYPES, attack_inputs, rand, skip_unsupported
from part_fast import backends, ops, reference
from part_fast.check.op_count import OpCounter

EXTENSION_LOADED = ops.EXTENSION_ERROR is None
# A build made with PART_FAST_NO_EXTENSION=1 has no part_fast/_C*.so at all; an extension that exists but
# fails to load (missing library, ABI mismatch) is a broken install and must not be skipped over.
EXTENSION_NOT_BUILT = isinstance(ops.EXTENSION_ERROR, ModuleNotFoundError) and ops.EXTENSION_ERROR.name == "part_fast._C"
needs_extension = pytest.mark.skipif(
    not EXTENSION_LOADED, reason=f"needs the compiled extension part_fast._C ({ops.EXTENSION_ERROR!r})"
)


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
    """The package is installed with its extension here: a missing one must not go unnoticed, unless it was
    built without it on purpose (PART_FAST_NO_EXTENSION=1: no extension file at all)."""
    if EXTENSION_NOT_BUILT:
        pytest.skip(f"part_fast._C was not built (a PART_FAST_NO_EXTENSION=1 install): {ops.EXTENSION_ERROR!r}")
    assert EXTENSION_LOADED, f"part_fast._C failed to load: {ops.EXTENSION_ERROR!r}"
    assert "cpu" in BACKENDS
    for name in ("pgd_step_", "project_", "cam_eps_map"):
        assert hasattr(torch.ops.part_fast, name)


def test_triton_listed_only_when_interpreted_on_cpu():
    kernels = backends._triton_kernels()
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1"
    assert ("triton" in ops.available_backends("cpu")) == (kernels is not None)
    assert (ops.TRITON_ERROR is None) == (kernels is not None), ops.TRITON_ERROR


class _FailImport(importlib.abc.MetaPathFinder):
    """Makes `import <name>` raise `error`, as a module failing at import time does."""

    def __init__(self, name, error):
        self.name, self.error = name, error

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            raise self.error


@pytest.fixture
def triton_not_imported_yet(monkeypatch):
    """ops as if the Triton kernels had never been imported; everything restored afterwards."""
    monkeypatch.setattr(backends, "_triton_module", backends._TRITON_UNSET)
    monkeypatch.setattr(backends, "_triton_error", None)
    for name in [m for m in sys.modules if m == "part_fast.kernels" or m.startswith("part_fast.kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    if hasattr(part_fast, "kernels"):
        monkeypatch.delattr(part_fast, "kernels")


def test_triton_not_installed_is_recorded_quietly(triton_not_imported_yet, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ModuleNotFoundError
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        error = ops.TRITON_ERROR  # reading it tries the import
        assert "triton" not in ops.available_backends("cpu")
    assert isinstance(error, ModuleNotFoundError) and error.name == "triton", repr(error)
    assert backends._triton_kernels() is None and ops.TRITON_ERROR is error


def test_triton_kernels_failing_to_import_warn(triton_not_imported_yet, monkeypatch):
    """Triton installed but part_fast.kernels broken is a bug: recorded in TRITON_ERROR and warned about,
    naming the exception, once."""
    pytest.importorskip("triton", reason="the warning is for an installed Triton")
    broken = AttributeError("module 'triton.language' has no attribute 'constexpr'")
    monkeypatch.setattr(sys, "meta_path", [_FailImport("part_fast.kernels", broken), *sys.meta_path])
    with pytest.warns(RuntimeWarning, match=r"part_fast\.kernels could not be imported.*AttributeError.*constexpr"):
        assert "triton" not in ops.available_backends("cpu")
    assert ops.TRITON_ERROR is broken
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        assert backends._triton_kernels() is None
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        ops.project_(torch.zeros((1, 1, 2, 2)), torch.zeros((1, 1, 2, 2)), 0.1)


def test_missing_triton_dependency_of_triton_warns(triton_not_imported_yet, monkeypatch):
    """A ModuleNotFoundError for anything but triton itself (a broken Triton install) is not "Triton not
    installed": it warns."""
    pytest.importorskip("triton", reason="the warning is for an installed Triton")
    broken = ModuleNotFoundError("No module named 'triton._C'", name="triton._C")
    monkeypatch.setattr(sys, "meta_path", [_FailImport("part_fast.kernels", broken), *sys.meta_path])
    with pytest.warns(RuntimeWarning, match="triton._C"):
        assert backends._triton_kernels() is None
    assert ops.TRITON_ERROR is broken


def test_default_backend_is_the_compiled_one():
    expected = "cpu" if EXTENSION_LOADED else "reference"
    assert ops.select_backend(torch.device("cpu")) == expected
    # interpreted Triton is never chosen by default
    assert ops.select_backend(torch.device("meta")) == "reference"


def _run_reference(x_adv, grad, x_nat, cam):
    eps = reference.cam_eps_map(cam, (8, 8), 8 / 255, 7 / 255)
    a = reference.pgd_step_(x_adv.clone(), grad, x_nat, eps, 2 / 255)
    b = reference.project_(x_adv.clone(), x_nat, eps)
    return eps, a, b


@pytest.mark.parametrize("backend", [None, *ALL_BACKENDS], ids=lambda b: f"backend={b or 'default'}")
def test_default_and_forced_match_the_reference(backend, gen):
    x_adv, grad, x_nat, cam = _inputs(gen)
    expected = _run_reference(x_adv, grad, x_nat, cam)
    with ops.use_backend(backend):
        got = _run_all(x_adv, grad, x_nat, cam)
    for name, g, e in zip(("cam_eps_map", "pgd_step_", "project_"), got, expected):
        assert torch.equal(g, e), f"{name} on backend {backend or ops.select_backend(x_adv.device)!r}"
    assert not torch.equal(got[1], x_adv), "the step moved x_adv"


# The floating dtypes a backend might be asked for; each is either supported (helpers.CPU_DTYPES) or
# rejected with a TypeError naming the argument.
CANDIDATE_DTYPES = [*DTYPES, *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", CANDIDATE_DTYPES, ids=str)
def test_documented_cpu_dtypes(backend, dtype):
    """helpers.CPU_DTYPES (which skip_unsupported skips by) is exactly what each backend accepts."""
    x = torch.full((1, 2, 3, 3), 0.5).to(dtype)
    cam = torch.rand((1, 3, 3), generator=torch.Generator().manual_seed(0)).to(dtype)
    calls = [("x_adv", lambda: ops.pgd_step_(x.clone(), x, x, 0.1, 0.05)),
             ("x_adv", lambda: ops.project_(x.clone(), x, 0.1)),
             ("cam", lambda: ops.cam_eps_map(cam, (4, 4), 0.1, 0.05))]
    with ops.use_backend(backend):
        for argument, call in calls:
            if dtype in CPU_DTYPES[backend]:
                call()
            else:
                with pytest.raises(TypeError, match=argument):
                    call()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", CANDIDATE_DTYPES, ids=str)
def test_skip_unsupported_skips_exactly_the_unsupported_dtypes(backend, dtype):
    if dtype in CPU_DTYPES[backend]:
        skip_unsupported(backend, dtype)  # returns: the case runs
        return
    with pytest.raises(pytest.skip.Exception, match=f"{backend!r} does not support {dtype}"):
        skip_unsupported(backend, dtype)


# ----------------------------------------------------------------------------------- use_backend
@needs_extension
def test_use_backend_routes_the_call(gen):
    x_adv, grad, x_nat, cam = _inputs(gen)
    with ops.use_backend("cpu"), OpCounter() as rec:
        _run_all(x_adv, grad, x_nat, cam)
    names = set(rec.names)
    assert {"part_fast.cam_eps_map", "part_fast.pgd_step_", "part_fast.project_"} <= names
    with ops.use_backend("reference"), OpCounter() as rec:
        _run_all(x_adv, grad, x_nat, cam)
    assert not any(n.startswith("part_fast.") for n in rec.names)
    assert rec.names, "the reference runs aten ops"


@pytest.mark.skipif("triton" not in BACKENDS, reason="part_fast.kernels (Triton) is not importable")
def test_use_backend_triton_routes_to_kernels(monkeypatch, gen):
    kernels = backends._triton_kernels()
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
    with ops.use_backend("triton"), OpCounter() as rec:
        _run_all(x_adv, grad, x_nat, cam)
    assert calls == ["cam_eps_map", "pgd_step", "pgd_step"]
    ours = [n for n in rec.names if n.startswith("part_fast.")]
    assert ours == ["part_fast.triton_cam_eps_map", "part_fast.triton_pgd_step_",
                    "part_fast.triton_project_"], "the Triton ops, never the compiled extension's"


def test_use_backend_unknown_name_is_value_error():
    with pytest.raises(ValueError, match="backend"), ops.use_backend("tpu"):
        pass
    with pytest.raises(ValueError), ops.use_backend("CPU"):
        pass
    assert backends._forced_backend.get() is None


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


@needs_extension
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
    with pytest.raises(KeyError), ops.use_backend("reference"):
        raise KeyError("boom")
    assert ops.select_backend(device) == auto
    assert backends._forced_backend.get() is None


def test_use_backend_is_per_thread():
    """Two threads forcing different backends at the same time each run their own; the main thread's
    choice is untouched."""
    device = torch.device("cpu")
    auto = ops.select_backend(device)
    names = ["reference", BACKENDS[0] if BACKENDS else None]
    inside = threading.Barrier(3, timeout=30)  # both workers inside their blocks, and the main thread looking
    done = threading.Barrier(3, timeout=30)

    def worker(name):
        with ops.use_backend(name):
            inside.wait()
            seen = [ops.select_backend(device)]
            done.wait()  # the other thread has set its backend and read it too
            seen.append(ops.select_backend(device))
        return [*seen, ops.select_backend(device)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(worker, name) for name in names]
        inside.wait()
        main_during = ops.select_backend(device)
        done.wait()
        seen = [future.result(timeout=30) for future in futures]  # a worker's exception is raised here
    assert main_during == auto
    for name, seen_by_worker in zip(names, seen):
        assert seen_by_worker == [name or auto, name or auto, auto], (name, seen_by_worker)


def test_use_backend_is_per_asyncio_task():
    """Concurrent asyncio tasks forcing different backends each see their own across awaits."""
    device = torch.device("cpu")
    names = ["reference", BACKENDS[0] if BACKENDS else None]

    async def task(name, mine, other):
        with ops.use_backend(name):
            mine["set"].set()
            await other["set"].wait()  # both backends are forced before either task looks
            seen = ops.select_backend(device)
            mine["read"].set()
            await other["read"].wait()  # neither block ends before both have looked
            return seen

    async def both():
        a, b = ({"set": asyncio.Event(), "read": asyncio.Event()} for _ in range(2))
        return await asyncio.gather(task(names[0], a, b), task(names[1], b, a))

    auto = ops.select_backend(device)
    assert asyncio.run(both()) == [name or auto for name in names]
    assert ops.select_backend(device) == auto


# --------------------------------------------------------------------------- subprocess checks
def _python(code, env_extra=None, drop=("PART_FAST_BACKEND",), timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, env=env, capture_output=True,
                          text=True, timeout=timeout)


PROBE = """
import json, threading, torch
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

def in_a_thread():  # a new thread starts from PART_FAST_BACKEND too, and may choose automatically
    seen = result["in_a_thread"] = []
    for forced in ("default", None):
        try:
            if forced == "default":
                seen.append(ops.select_backend(torch.device("cpu")))
            else:
                with ops.use_backend(forced):
                    seen.append(ops.select_backend(torch.device("cpu")))
        except Exception as e:
            seen.append(type(e).__name__)

thread = threading.Thread(target=in_a_thread)
thread.start()
thread.join()
print("RESULT" + json.dumps(result))
"""


def _result(proc):
    assert proc.returncode == 0, proc.stderr
    line = [text for text in proc.stdout.splitlines() if text.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("name", ["reference", "cpu", "cuda", "triton", ""])
def test_env_var_forces_backend(name):
    """PART_FAST_BACKEND is the forced backend of this thread and of every new one that has not chosen
    another; an unusable one raises when an op runs."""
    proc = _python(PROBE, {"PART_FAST_BACKEND": name, "TRITON_INTERPRET": "1"})
    r = _result(proc)
    auto = "cpu" if EXTENSION_LOADED else "reference"
    if name == "":  # empty means unset: automatic choice
        assert r["selected"] == auto and r["error"] is None
        assert r["in_a_thread"] == [auto, auto]
    elif name in r["available"]:
        assert r["selected"] == name and r["error"] is None
        assert r["in_a_thread"] == [name, auto]
    else:
        assert r["error"] == "RuntimeError" and name in r["message"]
        assert r["in_a_thread"] == ["RuntimeError", auto]
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
                           str(tmp_path / "out.pt")], check=False, env=env, capture_output=True, text=True,
                          timeout=240)
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


def test_op_tests_run_on_the_gpu_where_there_is_one():
    """The comparison tests of test_pgd_step.py and test_cam_eps_map.py are parametrised over
    helpers.DEVICE_BACKENDS: on a GPU machine that adds the cuda and triton backends on CUDA tensors (and the
    Triton interpreter is off, so Triton is compiled for the GPU)."""
    from helpers import DEVICE_BACKENDS, GPU, target_id

    if not GPU:
        pytest.skip("no GPU here: the op tests ran every backend on CPU tensors (Triton interpreted); on a GPU "
                    "machine the same tests also run cuda and triton on CUDA tensors (ids ending -on-cuda)")
    ids = [target_id(t) for t in DEVICE_BACKENDS]
    assert {"cuda-on-cuda", "triton-on-cuda"} <= set(ids), ids
    assert os.environ.get("TRITON_INTERPRET") != "1", "Triton must compile for the GPU, not run interpreted"
