"""`part-fast check`: on the CPU it runs every section that applies and passes; a wrong backend, a crash
or a wrong training step fails it; the report names what failed. (On a GPU machine the same command is the
proof of the GPU path: bench/README.md gives the command.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from part_fast import ops
from part_fast.check import correctness, run_check, training
from part_fast.check.inputs import EPS_FORMS, make_eps, same_strides_on
from part_fast.check.runner import FAIL, INFO, PASS, SKIP, CheckReport, Context, Recorder, report_stem

pytestmark = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="needs the compiled extension part_fast._C")


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    """As `part-fast check` runs for a user: conftest's TRITON_INTERPRET=1 would add the Triton interpreter
    (a correctness tool, minutes at real sizes) to the CPU's backends."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in ops.available_backends("cpu")


def by_name_status(saved: dict, status: str = SKIP) -> dict:
    return {o["name"]: o["status"] for o in saved["outcomes"] if o["status"] == status}


@pytest.fixture
def ctx():
    return Context(torch.device("cpu"), quick=True)  # quick: 3 shapes, 2 of them odd


def test_correctness_section_passes_on_the_cpu(ctx):
    report = run_check("cpu", quick=True, sections=("environment", "correctness"))
    statuses = {o.name: o.status for o in report.outcomes}
    assert statuses == {"versions": INFO, "GPU": INFO, "backends loaded": PASS, "fast backends to check": PASS,
                        "cpu: pgd_step_ / project_ vs reference": PASS, "cpu: cam_eps_map vs reference": PASS,
                        "cpu: torch.library.opcheck": PASS, "cpu: torch.compile(fullgraph=True)": PASS}, statuses
    attack = next(o for o in report.outcomes if o.name == "cpu: pgd_step_ / project_ vs reference")
    assert attack.data["cases"] == 2 * 3 * 3 * 2 * 7 and attack.data["failed_cases"] == 0
    assert report.passed


def test_a_backend_that_differs_fails_and_names_the_case(ctx, monkeypatch):
    real = correctness.reference.pgd_step_

    def off_by_one_ulp(x_adv, grad, x_nat, eps, step, lo=0.0, hi=1.0):
        out = real(x_adv, grad, x_nat, eps, step, lo, hi)
        return out.copy_(torch.nextafter(out, torch.full_like(out, 2.0)))

    monkeypatch.setattr(correctness.reference, "pgd_step_", off_by_one_ulp)
    # The odd shapes only: the CIFAR-batch shape (most of this test's time) would only repeat their verdicts.
    monkeypatch.setitem(correctness.QUICK_ATTACK_SHAPES, "real", [])
    ok, figure, data = correctness.check_attack_ops(ctx, "cpu")
    assert ok is False
    # every pgd_step_ case (2 shapes x 3 dtypes x 2 layouts x 7 eps forms), no project_ case
    assert data["cases"] == 2 * 2 * 3 * 2 * 7 and data["failed_cases"] == 2 * 3 * 2 * 7
    assert "first: pgd_step_ (3, 3, 7, 5) float32 contiguous eps=scalar:" in figure


def test_a_crash_is_a_failed_check_not_the_end_of_the_run():
    report = CheckReport({"date": "2026-12-03T00:00:00", "cpu": "x", "torch": "t", "python": "p"}, "cpu", True)
    recorder = Recorder(report)
    recorder.check("timings", "boom", lambda: 1 / 0)
    recorder.check("timings", "fine", lambda: (None, "3 µs", {"us": 3}))
    assert [(o.name, o.status) for o in report.outcomes] == [("boom", FAIL), ("fine", INFO)]
    assert report.outcomes[0].figure == "raised ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in report.outcomes[0].data["traceback"]
    assert not report.passed and report.to_json()["failed"] == ["timings: boom"]
    assert "# part_fast check: FAILED" in report.markdown() and "| boom | FAIL |" in report.markdown()


def test_a_step_whose_budget_differs_fails(ctx, monkeypatch):
    """The training check compares the step's budget with a recomputation: a step that used another budget
    (here one element flipped) fails."""
    original = training._RecordingBudget.with_logits

    def tampered(self, model, x):
        eps_map, logits = original(self, model, x)
        self.maps[-1].view(-1)[0] = -1.0
        return eps_map, logits

    monkeypatch.setattr(training._RecordingBudget, "with_logits", tampered)
    ok, figure, data = training.check_part_step(ctx)
    assert ok is False and data["budget_differs"] == 1 and data["finite"]
    assert "1 of 12,288 elements differ" in figure


@pytest.mark.parametrize("form", EPS_FORMS)
def test_inputs_keep_their_strides_on_another_device(form):
    gen = torch.Generator().manual_seed(0)
    eps = make_eps(form, (2, 3, 5, 7), "channels_last", gen)
    if not isinstance(eps, torch.Tensor):
        assert same_strides_on(eps, "meta") == eps
        return
    moved = same_strides_on(eps, torch.device("meta"))
    assert moved.device.type == "meta"
    assert (moved.shape, moved.stride(), moved.storage_offset()) == (eps.shape, eps.stride(), eps.storage_offset())
    offset = torch.arange(40.0).view(4, 10)[1:, 3::2]
    assert same_strides_on(offset, "meta").storage_offset() == offset.storage_offset() == 13


def test_report_file_names():
    assert report_stem({"date": "2026-12-03T21:00:00+00:00", "gpu": "NVIDIA H200", "cpu": "AMD EPYC"}) == \
        "check-2026-12-03-nvidia-h200"
    assert report_stem({"date": "2026-12-03T21:00:00+00:00", "gpu": None, "cpu": "Intel(R) Xeon(R) 2.1GHz"}) == \
        "check-2026-12-03-intel-r-xeon-r-2-1ghz"


@pytest.mark.slow
def test_whole_check_on_the_cpu_writes_its_report(tmp_path):
    """Every section that applies on the CPU, as a user runs it: `python -m part_fast.check --device cpu
    --quick --out DIR` (= `part-fast check ...`), exit 0, its two files."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PART_FAST_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "part_fast.check", "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == f"part-fast check: device cpu ({torch.get_num_threads()} threads) (quick)"
    assert proc.stdout.splitlines()[-1].startswith("part-fast check: passed in ")
    stems = {p.name.rsplit(".", 1)[0] for p in tmp_path.iterdir()}
    assert len(stems) == 1 and sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    stem = stems.pop()
    assert stem.startswith("check-") and stem.endswith("-quick")
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["passed"] is True and saved["device"] == "cpu" and saved["quick"] is True and saved["failed"] == []
    assert by_name_status(saved) == {"CAM on the device vs the CPU": SKIP, "release chain, torch.compile": SKIP}
    by_name = {o["name"]: o for o in saved["outcomes"]}
    assert by_name["CAM on the device vs the CPU"]["status"] == SKIP
    assert by_name["PART training step (AMP bf16, channels_last)"]["status"] == PASS
    steps = by_name["training step: AT / PART / PART as released"]["data"]["seconds"]
    assert set(steps) == {"AT", "PART (ours)", "PART (release)"} and all(s > 0 for s in steps.values())
    launches = by_name["kernel launches"]["data"]
    assert launches["update_fused"] == 1 and launches["update_release"] > 5
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert markdown.startswith("# part_fast check: PASSED") and "## 4. timings" in markdown


def test_a_failed_check_exits_1(monkeypatch, capsys):
    from part_fast import cli
    from part_fast.check import runner

    def failing(device, *, quick, out=None):
        report = CheckReport(runner.machine_info(torch.device("cpu")), "cpu", quick)
        Recorder(report).check("correctness", "cpu: cam_eps_map vs reference",
                               lambda: (False, "3 cases differ", {}))
        return report

    monkeypatch.setattr("part_fast.check.run_check", failing)
    assert cli.main(["check", "--device", "cpu", "--quick"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "part-fast check: FAILED (correctness: cpu: cam_eps_map vs reference) in ")


def test_no_fast_backend_fails_without_ending_the_run(monkeypatch):
    monkeypatch.setattr(correctness, "device_backends", lambda ctx: [])
    report = run_check("cpu", quick=True, sections=("correctness",))
    assert [(o.name, o.status, o.figure) for o in report.outcomes] == [
        ("fast backends to check", FAIL, "no fast backend usable on cpu: only the reference")]


def test_out_folder_that_cannot_be_made_fails_before_the_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError):
        run_check("cpu", quick=True, out=blocker / "sub", sections=("environment",))
