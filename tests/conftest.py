"""Fixtures of the tests. What the op tests share besides fixtures is in helpers.py, imported first here
because it sets TRITON_INTERPRET before Triton can be imported."""
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import seed_of
from part_fast import backends

# TorchInductor compiles scalar C++ kernels for the tests that torch.compile (--compile training, the ops
# under fullgraph, the check), here and in the processes they start: the same graphs, guards and recompiles,
# which is what those tests are about, while gcc compiling the SIMD kernels was most of their time on a cold
# cache. The vectoriser is torch's to test. An environment variable, read when torch._inductor is first
# imported, rather than its config object: importing torch._inductor.config here made test_compile.py's
# interpreted Triton ops fail ("Cannot call @triton.jit'd outside of the scope of a kernel", from tl.sum).
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: one intra-op thread each, in the worker and in the processes its tests start.
    # (OpenMP threads spin-waiting for a core that another worker holds make a run several times slower.)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# pytest-xdist (pyproject's addopts run the suite in one worker per core) sends each group of tests to one
# worker. A group is a test file, so that a file's shared runs are made once, except that files sharing a
# session fixture are one group, so that it is made once too.
SHARED_SESSION_FIXTURE = {
    "test_distributed.py": "uninterrupted_pair", "test_multinode.py": "uninterrupted_pair",
    "test_preemption.py": "mid_run", "test_checkpoint.py": "mid_run", "test_epoch_progress.py": "mid_run",
}


# The groups that take longest (seconds of their tests in a whole run, --durations, 2026-12-06, AMD EPYC, 2
# cores) are handed out first; the rest follow in file order. xdist's own order (most tests first) started the
# torchrun group, a quarter of the suite in a handful of tests, last: the other worker then sat idle.
GROUP_SECONDS = {"uninterrupted_pair": 256, "test_bench_harness.py": 99, "test_robustbench_protocol.py": 71,
                 "test_train.py": 61, "test_check.py": 53, "test_pgd_step.py": 44, "mid_run": 38}


def _group(nodeid: str) -> str:
    file = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SHARED_SESSION_FIXTURE.get(file, file)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # xdist's own --dist loadgroup needs item._nodeid, which pytest 9 no longer reads: a scheduler of ours.
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerPerGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order, longest groups first (below)
    return OneWorkerPerGroup(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and all must agree: a stable sort
        items.sort(key=lambda item: -GROUP_SECONDS.get(_group(item.nodeid), 0))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded by the test's node id (test name + params): fresh but reproducible inputs."""
    return torch.Generator().manual_seed(seed_of(request.node.nodeid))


@pytest.fixture
def logged(caplog):
    """What part_fast logs at INFO and above during the test: `logged.messages`, in order."""
    caplog.set_level(logging.INFO, logger="part_fast")
    return caplog


@pytest.fixture(autouse=True)
def _automatic_backend():
    """Every test starts with no forced backend, whatever PART_FAST_BACKEND the runner had, and leaves the
    forced backend as it found it."""
    token = backends._forced_backend.set(None)
    yield
    backends._forced_backend.reset(token)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of small models: as fast on an idle machine, and on a loaded one it
    avoids OpenMP workers spin-waiting for a core (several times slower with 2 threads on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Real CIFAR-10 images in ImageFolder layout, next to the project on development and CI machines only.
CIFAR_SUBSET_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-subset.tar"


@pytest.fixture(scope="session", autouse=True)
def _subprocess_tmpdir(tmp_path_factory):
    """The processes a test starts (torchrun, its agents) make their temporary files under pytest's own
    temporary folder, which pytest prunes (it keeps the last 3 runs'): an agent the lost-node tests SIGKILL
    cannot remove its /tmp/torchelastic_* folder, and /tmp would keep one per kill. This process's own
    tempfile.gettempdir() was fixed at its first use and does not change."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("subprocess-tmp")))
        yield


@pytest.fixture(scope="session")
def cifar_subset_dir(tmp_path_factory) -> Path:
    """cifar10-subset.tar extracted once per session: <dir>/{train,test}/<class>/NNNN.jpg."""
    if not CIFAR_SUBSET_TAR.is_file():
        pytest.skip(f"{CIFAR_SUBSET_TAR} is absent (test data outside the project; present in CI)")
    root = tmp_path_factory.mktemp("cifar10-subset")
    with tarfile.open(CIFAR_SUBSET_TAR) as archive:
        archive.extractall(root, filter="data")
    return root / "cifar10-subset"


@pytest.fixture(scope="session")
def elastic(tmp_path_factory) -> list[str]:
    """The fault-tolerance runs' `part-fast train` flags: helpers.ELASTIC and `--extra-data FILE`."""
    from helpers import ELASTIC, write_extra_shapes
    return [*ELASTIC, "--extra-data", str(write_extra_shapes(tmp_path_factory.mktemp("extra") / "shapes.npz"))]


@pytest.fixture(scope="session")
def uninterrupted_pair(tmp_path_factory, elastic) -> Path:
    """RUN_DIR of a 2-process torchrun of `elastic` with no fault: what the fault-tolerance tests (one node
    and two) must end equal to."""
    from helpers import run_uninterrupted_pair
    return run_uninterrupted_pair(tmp_path_factory.mktemp("ddp-ref") / "run", elastic)


@pytest.fixture(scope="session")
def mid_run(tmp_path_factory):
    """helpers.MID trained once in this process, on one thread, with a checkpoint every 3 steps: (RUN_DIR, its
    history, the (epoch, step_in_epoch, global_step) of every checkpoint it wrote). What the one-process stop
    and resume tests end equal to (a checkpoint does not change the run); a test copies RUN_DIR before it
    changes anything there."""
    from helpers import MID, tiny
    from part_fast.train import checkpoint, train

    out = tmp_path_factory.mktemp("mid") / "run"
    saved = []
    real_save = checkpoint.save

    def recording_save(path, ckpt, **kw):
        saved.append((ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]))
        return real_save(path, ckpt, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(checkpoint, "save", recording_save)
            history = train(tiny(out, **MID, save_every_steps=3, save_every_minutes=0))
    finally:
        torch.set_num_threads(threads)
    return out, history, saved
