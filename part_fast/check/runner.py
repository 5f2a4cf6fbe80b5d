"""The check's bookkeeping: a context (device, size preset, timer), outcomes recorded one check at a time
so that one failing or crashing check never hides the others, and the report written as JSON + markdown."""
from __future__ import annotations

import datetime
import json
import logging
import platform
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..devices import describe_device, resolve_device
from ..extras import MissingExtraError
from ..files import atomic_write_text

logger = logging.getLogger(__name__)

PASS, FAIL, INFO, SKIP = "pass", "fail", "info", "skip"
SECTIONS = ("environment", "correctness", "models", "timings")


class Skipped(Exception):
    """A check that does not apply here; the message says why."""


@dataclass
class Outcome:
    section: str
    name: str
    status: str  # pass / fail (a wrong result or a crash) / info (a measurement) / skip (does not apply here)
    figure: str  # what was measured, for a person
    data: dict = field(default_factory=dict)  # the same, for a program
    seconds: float = 0.0


@dataclass
class Context:
    """What every check reads: the device and whether the run is --quick."""

    device: torch.device
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass
class CheckReport:
    machine: dict
    device: str  # the device checked, e.g. "cuda" or "cuda:1" ("auto" resolved)
    quick: bool
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_json(self) -> dict:
        return {"machine": self.machine, "device": self.device, "quick": self.quick, "passed": self.passed,
                "failed": [f"{o.section}: {o.name}" for o in self.failed], "seconds": round(self.seconds, 2),
                "outcomes": [asdict(o) for o in self.outcomes]}

    def markdown(self) -> str:
        m = self.machine
        lines = [f"# part_fast check: {'PASSED' if self.passed else 'FAILED'}", "",
                 f"`part-fast check --device {self.device}{' --quick' if self.quick else ''}`, {m['date']}, "
                 f"{m.get('gpu') or m['cpu']}, torch {m['torch']}, triton {m.get('triton') or 'none'}, "
                 f"Python {m['python']}; {self.seconds:.0f} s in all."]
        if self.failed:
            lines += ["", "Failed: " + "; ".join(f"{o.section}: {o.name}" for o in self.failed) + "."]
        for section in SECTIONS:
            rows = [o for o in self.outcomes if o.section == section]
            if not rows:
                continue
            lines += ["", f"## {SECTIONS.index(section) + 1}. {section}", "", "| check | result | figure | s |",
                      "|---|---|---|---:|"]
            lines += [f"| {o.name} | {o.status.upper() if o.status == FAIL else o.status} | "
                      f"{o.figure.replace('|', '/')} | {o.seconds:.1f} |" for o in rows]
        return "\n".join(lines) + "\n"


class Recorder:
    """Runs checks one at a time: an exception is a failed check (its message and the innermost frames
    kept), never the end of the run."""

    def __init__(self, report: CheckReport):
        self.report = report

    def check(self, section: str, name: str, fn: Callable[[], tuple]) -> Outcome:
        """fn() -> (ok, figure, data): ok True / False for a verdict, None for a measurement."""
        start = time.perf_counter()
        try:
            ok, figure, data = fn()
            status = INFO if ok is None else (PASS if ok else FAIL)
        except (Skipped, MissingExtraError) as why:  # an optional package missing: the check cannot run here
            status, figure, data = SKIP, str(why), {}
        except Exception as err:  # noqa: BLE001 - a crash is this check's failure, reported, not the run's end
            status, figure = FAIL, f"raised {type(err).__name__}: {_one_line(str(err))}"
            data = {"traceback": traceback.format_exc(limit=-6)}
        outcome = Outcome(section, name, status, figure, data, time.perf_counter() - start)
        self.report.outcomes.append(outcome)
        logger.info(f"  [{status}] {name}: {figure}")
        return outcome


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def machine_info(device: torch.device) -> dict:
    from .environment import cpu_model, triton_version

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "torch": torch.__version__, "python": platform.python_version(), "triton": triton_version(),
            "device": describe_device(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def report_stem(machine: dict) -> str:
    """check-<date>-<machine>: the GPU's name on a GPU, else the CPU's, as a file name."""
    name = machine.get("gpu") or machine["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "machine"
    return f"check-{machine['date'][:10]}-{slug}"


def run_check(device: str | torch.device = "auto", *, quick: bool = False, out: str | Path | None = None,
              sections=SECTIONS) -> CheckReport:
    """Run the sections on `device`, logging each verdict at INFO as it comes (part_fast.logs).

    Args:
        device: "auto", "cpu", "cuda", "cuda:N" or a torch.device.
        quick: shrink every case (seconds instead of minutes).
        out: a folder to write check-<date>-<machine>.json and .md in (made if missing), or None.
        sections: which of SECTIONS to run, in SECTIONS' order.

    Returns:
        The CheckReport: every outcome (section, name, pass / FAIL / skip / info, figure, data) and the machine.
    """
    from . import correctness, environment, timing, training

    device = resolve_device(device)
    if out is not None:  # before minutes of work, not after: a folder that cannot be made fails now
        Path(out).mkdir(parents=True, exist_ok=True)
    ctx = Context(device, quick)
    report = CheckReport(machine_info(device), str(device), quick)
    recorder = Recorder(report)
    started = time.perf_counter()
    modules = {"environment": environment, "correctness": correctness, "models": training, "timings": timing}
    logger.info(f"part-fast check: device {describe_device(device)}{' (quick)' if quick else ''}")
    for section in sections:
        logger.info(f"[{SECTIONS.index(section) + 1}/{len(SECTIONS)}] {section}")
        modules[section].run(ctx, lambda name, fn, section=section: recorder.check(section, name, fn))
    report.seconds = time.perf_counter() - started
    if out is not None:
        folder = Path(out)
        stem = report_stem(report.machine) + ("-quick" if quick else "")
        atomic_write_text(folder / f"{stem}.json", json.dumps(report.to_json(), indent=2, default=str) + "\n")
        atomic_write_text(folder / f"{stem}.md", report.markdown())
        logger.info(f"wrote {folder / stem}.json and .md")
    return report
