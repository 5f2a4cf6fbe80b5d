"""What `pip install .` and `pip install -e .` give: the layout of the design card (the Triton kernels in the
top-level kernels/ folder) installed as one package, part_fast, with the kernels as its subpackage
part_fast.kernels through pyproject.toml's package-dir mapping and no import fallback or path bootstrap.

- every Python package of the source tree is listed in pyproject.toml (an editable install finds unlisted
  subpackages anyway, so only these tests notice one missing from a wheel), and kernels/ is the one folder
  remapped;
- a wheel built from the tree holds every module of part_fast, the kernels under part_fast/kernels/, and
  nothing else at top level;
- an editable install imports part_fast.kernels from kernels/, from anywhere and from the checkout itself
  (the tests' case: part_fast from ./part_fast on sys.path[0], part_fast.kernels through the install's finder).
"""
from __future__ import annotations

import json
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
KERNELS = ROOT / "kernels"  # installed as part_fast.kernels
KERNEL_MODULES = ("__init__", "pgd_step", "cam_eps_map", "ptx")
# What a build needs of the tree (setup.py reads README.md through pyproject's `readme`).
SOURCES = ("part_fast", "kernels", "pyproject.toml", "setup.py", "README.md")


def _packages_on_disk() -> set[str]:
    """Import names of the packages in the tree: part_fast/** by their folders, kernels/** under part_fast.kernels."""
    names = {".".join(init.parent.relative_to(ROOT).parts) for init in PACKAGE.rglob("__init__.py")}
    names |= {".".join(("part_fast", "kernels", *init.parent.relative_to(KERNELS).parts))
              for init in KERNELS.rglob("__init__.py")}
    return names


def _installed_modules() -> set[str]:
    """The paths the tree's Python files have once installed (in a wheel, in site-packages)."""
    def files(folder: Path) -> list[Path]:
        return [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]

    return ({p.relative_to(ROOT).as_posix() for p in files(PACKAGE)}
            | {"part_fast/kernels/" + p.relative_to(KERNELS).as_posix() for p in files(KERNELS)})


def _copy_sources(dest: Path) -> Path:
    """The files a build reads, copied without build outputs (compiled extensions, egg-info, build/)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _build_env() -> dict[str, str]:
    """No compiled extension (PART_FAST_NO_EXTENSION=1: seconds instead of minutes; the Python files are the
    same), and no PYTHONPATH: a checkout on it would be imported instead of what was installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PART_FAST_NO_EXTENSION"] = "1"
    return env


def test_every_package_is_listed_and_only_kernels_is_remapped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # The Triton kernels live in the top-level kernels/. A part_fast/kernels/ folder, even one left holding only
    # the __pycache__ of the old layout, would shadow them: it imports as an empty namespace package first.
    assert not (PACKAGE / "kernels").exists(), "remove part_fast/kernels/: the kernels live in kernels/"
    assert {f"{m}.py" for m in KERNEL_MODULES} <= {p.name for p in KERNELS.glob("*.py")}
    listed = set(config["packages"])
    on_disk = _packages_on_disk()
    assert "part_fast.kernels" in on_disk
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
    # Only kernels/ is remapped; every other package is found where its name says.
    assert config.get("package-dir") == {"part_fast.kernels": "kernels"}, config.get("package-dir")


def test_nothing_bootstraps_the_import_path():
    """part_fast.kernels resolves through the install alone: no package or conftest edits sys.path or a
    package's __path__ to find it."""
    bootstrap = re.compile(r"__path__\s*(=|\+=|\.(append|insert|extend))|sys\.path\s*(=|\+=|\.(append|insert|extend))"
                           r"|extend_path\(")
    files = [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py"), *ROOT.glob("tests/conftest.py"), *ROOT.glob("tests/helpers.py"),
             *ROOT.glob("bench/conftest.py")]
    found = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
             if bootstrap.search(line)]
    assert not found, found


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The file names inside a wheel built from a copy of the source tree without the compiled extension."""
    work = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(work / "source")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", str(work / "dist"), str(source)],
        check=False, env=_build_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    wheels = list((work / "dist").glob("part_fast-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as archive:
        return set(archive.namelist())


def test_wheel_ships_every_module_and_the_kernels(wheel_names):
    shipped = {name for name in wheel_names if name.endswith(".py")}
    assert {f"part_fast/kernels/{m}.py" for m in KERNEL_MODULES} <= shipped, sorted(shipped)
    expected = _installed_modules()
    assert shipped == expected, (f"absent from the wheel: {sorted(expected - shipped)}; "
                                 f"extra: {sorted(shipped - expected)}")
    # nothing outside the package: no top-level `kernels`, tests or bench
    top_level = {name.split("/")[0] for name in wheel_names} - {"part_fast"}
    assert len(top_level) == 1 and top_level.pop().endswith(".dist-info"), sorted(top_level)


# Prints where the modules came from, as JSON on the last line.
IMPORT_KERNELS = ("import json, part_fast, part_fast.kernels, part_fast.kernels.pgd_step; "
                  "print(json.dumps({'part_fast': part_fast.__file__, 'kernels': part_fast.kernels.__file__, "
                  "'pgd_step': part_fast.kernels.pgd_step.__file__}))")


@pytest.fixture(scope="module")
def editable(tmp_path_factory) -> tuple[Path, Path]:
    """(python, tree): a fresh virtual environment holding an editable install of a copy of the source tree.

    The venv is made from the running interpreter with --system-site-packages, so torch and Triton are there
    without reinstalling them. When the running interpreter is itself a venv, --system-site-packages reaches
    the base interpreter's site-packages, not this venv's: a .pth file then lists this interpreter's
    site-packages folders. Those folders are only put on sys.path (the .pth files in them, such as an editable
    part_fast installed here, are not run), and the .pth is named to be read after the install's own
    __editable__ one, whose finder module must be the new venv's, not one of the same name found here."""
    work = tmp_path_factory.mktemp("editable")
    tree = _copy_sources(work / "tree")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, capture_output=True, text=True, timeout=300)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if sys.prefix != sys.base_prefix:
        site_dirs = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
        venv_site = json.loads(subprocess.run(
            [str(python), "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
            check=True, capture_output=True, text=True, timeout=120).stdout)[0]
        (Path(venv_site) / "part_fast_test_parent_site.pth").write_text("".join(f"{p}\n" for p in site_dirs))
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
         "-q", "-e", str(tree)],
        check=False, cwd=work, env=_build_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return python, tree


def _import_kernels(python: Path, cwd: Path) -> dict[str, Path]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", IMPORT_KERNELS], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: Path(file).resolve() for name, file in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def test_editable_install_imports_the_kernels_folder(editable, tmp_path):
    """From outside the tree, part_fast is the tree's part_fast/ and part_fast.kernels its kernels/."""
    python, tree = editable
    found = _import_kernels(python, cwd=tmp_path)
    assert found["part_fast"] == (tree / "part_fast" / "__init__.py").resolve(), found
    assert found["kernels"] == (tree / "kernels" / "__init__.py").resolve(), found
    assert found["pgd_step"] == (tree / "kernels" / "pgd_step.py").resolve(), found


def test_editable_install_imports_the_kernels_from_the_checkout(editable):
    """With the checkout as the working directory (how the tests run), part_fast comes from ./part_fast via
    sys.path[0], whose folder has no kernels/: part_fast.kernels still resolves, through the install."""
    python, tree = editable
    found = _import_kernels(python, cwd=tree)
    assert found["part_fast"] == (tree / "part_fast" / "__init__.py").resolve(), found
    assert found["kernels"] == (tree / "kernels" / "__init__.py").resolve(), found
    assert found["pgd_step"] == (tree / "kernels" / "pgd_step.py").resolve(), found


def test_torchattacks_version_advised_is_the_one_ci_installs(monkeypatch):
    """The 'aa-release' error message tells users to install the torchattacks release CI tests with."""
    from part_fast import evaluation as evaluate

    pins = re.findall(r"torchattacks==([\w.]+)", (ROOT / ".ci" / "run").read_text())
    assert pins == [evaluate.TORCHATTACKS_VERSION], pins
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # as if not installed
    with pytest.raises(evaluate.MissingExtraError) as info:
        evaluate.load_torchattacks()
    assert f"pip install --no-deps torchattacks=={evaluate.TORCHATTACKS_VERSION} " in str(info.value)
