"""What `pip install .` ships: every Python package of the source tree is listed in pyproject.toml (an
editable install finds unlisted subpackages anyway, so only these tests notice one missing from a wheel),
and a wheel built from the tree holds every module of part_fast, the Triton kernels included."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "part_fast"


def _packages_on_disk() -> set[str]:
    return {".".join(init.parent.relative_to(ROOT).parts) for init in PACKAGE.rglob("__init__.py")}


def _modules_on_disk() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = _packages_on_disk()
    assert "part_fast.kernels" in on_disk, "the Triton kernels live in part_fast/kernels/"
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
    # Packages are found where their names say: no folder is remapped (a remapped one needs import fallbacks).
    assert "package-dir" not in config, config.get("package-dir")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The file names inside a wheel built from a copy of the source tree without the compiled extension
    (PART_FAST_NO_EXTENSION=1: seconds instead of minutes; the Python files shipped are the same)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    shutil.copytree(PACKAGE, source / "part_fast", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "PART_FAST_NO_EXTENSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(work / "dist"),
         str(source)],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    wheels = list((work / "dist").glob("part_fast-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as archive:
        return set(archive.namelist())


def test_wheel_ships_every_module_and_the_kernels(wheel_names):
    shipped = {name for name in wheel_names if name.endswith(".py")}
    missing = _modules_on_disk() - shipped
    assert not missing, f"modules of part_fast absent from the wheel: {sorted(missing)}"
    kernels = {name for name in shipped if name.startswith("part_fast/kernels/")}
    assert {f"part_fast/kernels/{m}.py" for m in ("__init__", "pgd_step", "cam_eps_map", "ptx")} <= kernels
    # nothing outside the package: no top-level `kernels`, tests or bench
    top_level = {name.split("/")[0] for name in wheel_names} - {"part_fast"}
    assert len(top_level) == 1 and top_level.pop().endswith(".dist-info"), sorted(top_level)


def test_torchattacks_version_advised_is_the_one_ci_installs(monkeypatch):
    """The 'aa-release' error message tells users to install the torchattacks release CI tests with."""
    from part_fast import evaluate

    pins = re.findall(r"torchattacks==([\w.]+)", (ROOT / ".ci" / "run").read_text())
    assert pins == [evaluate.TORCHATTACKS_VERSION], pins
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # as if not installed
    with pytest.raises(evaluate.MissingExtraError) as info:
        evaluate.load_torchattacks()
    assert f"pip install --no-deps torchattacks=={evaluate.TORCHATTACKS_VERSION} " in str(info.value)
