"""What `pip install .` ships: every Python package of the source tree is listed in pyproject.toml (an
editable install finds unlisted subpackages anyway, so only this test notices one missing from a wheel)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    on_disk = set()
    for name, folder in mapped.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            on_disk.add(".".join([name, *relative.parts]))
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
