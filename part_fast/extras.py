"""The optional packages, and the one place that imports them.

`import part_fast` and its core (ops, reference, cam, budget, attacks, models, evaluate) need torch and
numpy alone. Everything else is in an extra of pyproject.toml and imported where it is used, through
`require`: a missing package becomes a `MissingExtraError`, one line that says what needed it and which
extra installs it, e.g.

    the cifar10 dataset needs the torchvision package, which is not installed: pip install "part_fast[train]"

(the command line prints it as `part-fast train: error: ...` and exits with 2, as for any user error).
Only the package itself being absent is reported so: a package that is installed but fails to import (a
broken install, a torchvision built for another torch) raises its own error, which names the real cause.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

# What `require` knows of each optional module: its pip distribution, the extra of pyproject.toml that
# installs it, and the top-level import names whose absence means the distribution is missing.
PACKAGES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "torchvision": ("torchvision", "train", ("torchvision",)),
    "PIL": ("pillow", "train", ("PIL",)),
    "tqdm": ("tqdm", "train", ("tqdm",)),
    "matplotlib": ("matplotlib", "plots", ("matplotlib",)),
    # torch's wrapper: its `import tensorboard` fails when the package is missing
    "torch.utils.tensorboard": ("tensorboard", "tensorboard", ("tensorboard",)),
    "tensorboard": ("tensorboard", "tensorboard", ("tensorboard",)),
    "pyautoattack": ("pyautoattack", "eval", ("pyautoattack",)),
    # in no extra: it pins an old requests, so it is installed with --no-deps (evaluation.load_torchattacks)
    "torchattacks": ("torchattacks", None, ("torchattacks",)),
}


class MissingExtraError(ConfigError, ImportError):
    """An optional package is not installed. An ImportError (what the import raised) and a ConfigError (a
    choice this installation cannot carry out: the command line prints it as one line and exits with 2).
    Its message is one line naming the package and the command that installs it."""


def _entry(module: str) -> tuple[str, str | None, tuple[str, ...]]:
    key = module
    while key not in PACKAGES and "." in key:
        key = key.rsplit(".", 1)[0]
    if key not in PACKAGES:
        raise KeyError(f"{module!r} is no optional package of part_fast's extras ({', '.join(PACKAGES)})")
    return PACKAGES[key]


def missing(what: str, package: str, extra: str | None = None, install: str | None = None) -> MissingExtraError:
    """The error for `what` needing the pip distribution `package`: install it with the extra `extra`, or
    with the command `install` for a package that no extra holds."""
    if install is None:
        install = f'pip install "part_fast[{extra}]"'
    return MissingExtraError(f"{what} needs the {package} package, which is not installed: {install}")


def is_absent(error: ModuleNotFoundError, module: str) -> bool:
    """Whether `error`, raised by importing `module`, says that `module`'s package is not installed (and
    not that something it imports in turn is missing: that is a broken install, and keeps its error)."""
    name = error.name
    if not name:
        return False
    names = {module}
    parts = module.split(".")
    names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    if any(module == k or module.startswith(k + ".") for k in PACKAGES):
        names.update(_entry(module)[2])
    return name in names


def require(module: str, what: str, extra: str | None = None, install: str | None = None) -> ModuleType:
    """`importlib.import_module(module)`; when its package is not installed, a MissingExtraError saying that
    `what` (e.g. "part-fast demo", "the cifar10 dataset", "attack 'aa'") needs it and naming the extra that
    installs it (by default the one PACKAGES gives the module)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not is_absent(error, module):
            raise
        package, default_extra, _ = _entry(module)
        raise missing(what, package, extra or default_extra, install) from None


def available(module: str) -> bool:
    """Whether `module` imports (a missing package is False; a broken one raises its error)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not is_absent(error, module):
            raise
        return False
    return True


class _NoBar:
    """What `progress_bar` gives when no bar is shown: the iterable itself, and the bar's methods as no-ops."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self):
        return len(self.iterable)

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable, *, disable: bool = False, **kwargs):
    """tqdm's progress bar over `iterable` (tqdm.auto), or the iterable unchanged when `disable` or when tqdm
    is not installed: a bar is a convenience, so its absence never stops training or evaluation."""
    if disable or not available("tqdm.auto"):
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


__all__ = ["MissingExtraError", "PACKAGES", "available", "is_absent", "missing", "progress_bar", "require"]
