"""`part-fast bench --quick`: every section runs and writes JSON + markdown + PNG; the README is regenerated
from the JSON. Figures are not asserted (a test is no benchmark), only that they exist and are sane."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # As many threads as the tests have (one per pytest-xdist worker): figures are not asserted here.
    done = subprocess.run([sys.executable, "-m", "part_fast", "bench", "--quick", "--threads",
                           str(torch.get_num_threads()), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


@pytest.mark.slow
def test_quick_run_writes_json_markdown_png(quick_run):
    out, done = quick_run
    stems = {p.suffix: p for p in out.iterdir() if not p.stem.endswith("-memory")}
    assert set(stems) == {".json", ".md", ".png"}
    assert {p.name for p in out.iterdir()} == {p.name for p in stems.values()} | {stems[".json"].stem + "-memory.png"}
    assert stems[".json"].stem.endswith("-quick") and stems[".json"].stem[:4].isdigit()
    result = json.loads(stems[".json"].read_text())
    assert result["quick"] is True
    # every section measured on the harness's --threads (the training step once kept its own 2)
    threads = torch.get_num_threads()
    assert (result["machine"]["torch_threads"], result["sections"]["stage"]["machine"]["torch_threads"],
            result["sections"]["train_step"]["config"]["threads"],
            result["sections"]["train_step"]["config"]["machine"]["torch_threads"]) == (threads,) * 4
    assert set(result["sections"]) == {"ops", "stage", "train_step", "gpu", "memory"}
    memory = result["sections"]["memory"]
    assert {(r["method"], r["batch"]) for r in memory["steps"]} == {
        (m, b) for m in ("AT", "PART (ours)", "PART (release)") for b in memory["config"]["batches"]}
    assert all(r["peak_mb"] > 0 for r in memory["steps"] + memory["stage"] + memory["scaling"])
    assert all(r["seconds"] > 0 for r in memory["scaling"])
    ops_rows = result["sections"]["ops"]["rows"]
    assert {r["dtype"] for r in ops_rows} == {"float32", "bfloat16"}
    assert {r["op"] for r in ops_rows} == {"clone", "pgd_step_", "project_", "cam_eps_map"}
    assert all(r["median_us"] > 0 and r["gb_per_s"] > 0 for r in ops_rows)
    assert any(r["impl"] == "release" for r in ops_rows)
    assert result["sections"]["train_step"]["rows"] and result["sections"]["gpu"]["markdown"]
    step_rows = {r["name"]: r for r in result["sections"]["train_step"]["rows"]}
    assert step_rows["PART + AWP"]["seconds"]["awp"] > 0 and step_rows["PART (ours)"]["seconds"]["awp"] == 0
    # Section 4 counts launches (measured) and computes no GPU time (nothing assumed).
    launches = {(r["op"], r["impl"], r["variant"]): r["launches"] for r in result["sections"]["gpu"]["launches"]}
    assert launches[("pgd_step_", "release", "(B,3,H,W)")] == 12 and launches[("pgd_step_", "ours (cpu)", "(B,3,H,W)")] == 1
    assert not {"assumptions", "projections"} & set(result["sections"]["gpu"])
    # Progress: the harness's own lines on stderr, as it printed them; the sections' logs stay quiet.
    # (warnings aside: where part_fast.kernels is not importable, ops warns once that Triton is not offered)
    lines = [line for line in done.stderr.splitlines() if line.startswith(("[", "wrote "))]
    assert lines[0].startswith("[1/5] ops: ") and lines[0].endswith(f" {len(ops_rows)} cases")
    assert lines[1:] == [
        "[2/5] CAM + budget stage and PGD-10 vs the release",
        "[3/5] one training step: AT, PART (ours), PART (release), TRADES, PART-T, PART + EMA / AWP",
        "[4/5] GPU evidence: PTX, CUDA resource usage, launches",
        "[5/5] memory of a training step and of the budget stage; the budget stage against the image size",
        f"wrote {stems['.json']}, {stems['.md']}, {stems['.png']}"]
    md = stems[".md"].read_text()
    # every section under one heading of its own (section 4 once rendered a second "## 4." inside the first)
    assert [line for line in md.splitlines() if line.startswith("## ")] == [
        "## Targets", "## 1. Ops", "## 2. CAM + budget stage and PGD-10 against the release",
        "## 3. One training step", "## 4. GPU evidence that needs no GPU", "## 5. Memory and scaling"]
    assert md.strip() in done.stdout
    with Image.open(stems[".png"]) as im:
        assert im.format == "PNG" and min(im.size) > 200


@pytest.mark.slow
def test_readme_blocks_are_regenerated_from_the_json(quick_run, tmp_path):
    out, _ = quick_run
    json_path = next(out.glob("*.json"))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:ops:start -->\nold\n<!-- bench:ops:end -->\nmiddle\n"
                      "<!-- bench:summary:start -->\nold\n<!-- bench:summary:end -->\n"
                      "<!-- bench:memory:start -->\nold\n<!-- bench:memory:end -->\nend\n")
    done = subprocess.run([sys.executable, "-m", "bench.run", "--from-json", str(json_path), "--readme", str(readme)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| pgd_step_ | cpu | 128×3×32×32 |" in text
    assert "| section | target | measured | goal | met |" in text
    assert "| batch | AT | PART (ours) | PART (release) |" in text and "| input | model | ours: ms / image |" in text
    # Rendering the same JSON twice gives the same README: nothing in it is typed by hand.
    again = subprocess.run([sys.executable, "-m", "bench.run", "--from-json", str(json_path), "--readme", str(readme)],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and readme.read_text() == text


@pytest.mark.slow
def test_from_json_renders_from_the_figures_alone(quick_run, tmp_path):
    """Every section is rendered from its figures: with the markdown the JSON keeps removed, --from-json
    prints the run's markdown file byte for byte."""
    out, _ = quick_run
    json_path = next(out.glob("*.json"))
    result = json.loads(json_path.read_text())
    for section in result["sections"].values():
        section.pop("markdown", None)
    figures_only = tmp_path / "figures.json"
    figures_only.write_text(json.dumps(result))
    done = subprocess.run([sys.executable, "-m", "bench.run", "--from-json", str(figures_only)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == json_path.with_suffix(".md").read_text() + "\n"  # print's newline after the file's text
    assert done.stderr == ""  # nothing measured, nothing written


def test_committed_readme_has_the_generated_blocks():
    text = (ROOT / "README.md").read_text()
    for marker in ("bench:ops", "bench:summary", "bench:memory"):
        assert f"<!-- {marker}:start -->" in text and f"<!-- {marker}:end -->" in text


def test_cpu_peak_memory_sees_a_known_allocation():
    """In a process set up as the memory worker is: a 64 MiB tensor allocated and freed inside the call is
    its peak (within 4 MiB of process noise), and a call that allocates nothing measures near zero."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        pytest.skip(f"/proc/self/clear_refs cannot be written here ({err.strerror}): the CPU peak needs it")
    code = ("import torch\n"
            "from bench.memory_report import peak_memory\n"
            "cpu = torch.device('cpu')\n"
            "def big():\n"
            "    t = torch.ones(16 * 2**20)\n"  # 64 MiB of float32, written so every page is resident
            "    del t\n"
            "big()\n"
            "print(peak_memory(big, cpu), peak_memory(lambda: None, cpu))\n")
    from bench.memory_report import WORKER_ENV

    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **WORKER_ENV})
    assert done.returncode == 0, done.stderr
    big, nothing = (int(v) for v in done.stdout.split())
    assert abs(big - 64 * 2**20) < 4 * 2**20, big
    assert nothing < 2**20, nothing


# ------------------------------------------------------------------ GPU evidence read from cuobjdump's text
RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN9part_fast10pgd_device10pgd_kernelE:
  REG:28 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0
arch = sm_90
Resource usage:
 Function _ZN9part_fast10pgd_device10pgd_kernelE:
  REG:31 STACK:8 SHARED:256 LOCAL:4 CONSTANT[0]:400 TEXTURE:0
"""
SASS = """
arch = sm_90
		Function : _ZN9part_fast10pgd_device10pgd_kernelE
        /*0040*/                   LDG.E.128 R4, [R2.64] ;                   /* 0x0000000402047981 */
        /*0050*/               @P0 LDG.E.128 R8, [R6.64] ;                   /* 0x0000000406087981 */
        /*0060*/                   LDG.E.U16 R3, [R2.64] ;                   /* 0x0000000c02037981 */
        /*0070*/                   STL [R1], R5 ;                            /* 0x0000000501007387 */
        /*0080*/                   LDL R5, [R1] ;                            /* 0x0000000001057983 */
        /*0090*/                   STG.E.128 [R2.64], R4 ;                   /* 0x0000000402007986 */
"""


def test_cuobjdump_resource_usage_is_read_per_arch_and_kernel():
    from bench.cuobjdump import parse_resource_usage

    usage = parse_resource_usage(RESOURCE_USAGE)
    name = "_ZN9part_fast10pgd_device10pgd_kernelE"
    assert usage == {(80, name): {"REG": 28, "STACK": 0, "SHARED": 0, "LOCAL": 0, "CONSTANT[0]": 400},
                     (90, name): {"REG": 31, "STACK": 8, "SHARED": 256, "LOCAL": 4, "CONSTANT[0]": 400}}


def test_sass_spills_and_access_widths_are_counted():
    from bench.cuobjdump import parse_sass, sass_access_bits

    code = parse_sass(SASS)[(90, "_ZN9part_fast10pgd_device10pgd_kernelE")]
    assert (code["STL"], code["LDL"]) == (1, 1)
    assert dict(code["LDG"]) == {"LDG.E.128": 2, "LDG.E.U16": 1}  # the predicated load counted too
    assert dict(code["STG"]) == {"STG.E.128": 1}
    assert [sass_access_bits(op) for op in ("LDG.E.128", "LDG.E.64", "STG.E.U16", "LDG.E.S8", "STG.E")] == [
        128, 64, 16, 8, 32]


def test_kernel_names_are_shortened_from_their_template_arguments():
    from bench.cuobjdump import short_kernel_name

    kinds = {"0": "scalar", "1": "dense", "2": "strided"}
    pgd = ("void part_fast::pgd_device::pgd_kernel<8, true, (part_fast::EpsPlan::Kind)2, true, c10::Half, c10::Half, "
           "unsigned int>(part_fast::pgd_device::PgdArgs<c10::Half, c10::Half, unsigned int>)")
    assert short_kernel_name("_Z...", pgd, kinds) == "pgd_kernel<VEC 8, step, strided eps by rows, x f16, eps f16, u32 index>"
    scalar = ("void part_fast::pgd_device::pgd_kernel<4, false, (part_fast::EpsPlan::Kind)0, false, float, float, "
              "unsigned long>(part_fast::pgd_device::PgdArgs<float, float, unsigned long>)")
    assert short_kernel_name("_Z...", scalar, kinds) == "pgd_kernel<VEC 4, project, scalar eps, x f32, u64 index>"
    cam = ("void part_fast::cam_device::cam_eps_map_kernel<c10::Half, false>(c10::Half const*, float*, "
           "part_fast::cam_device::Geometry, float, float)")
    assert short_kernel_name("_Z...", cam, kinds) == "cam_eps_map_kernel<cam f16, cam>"


# ------------------------------------------------------------------------- the timing toolkit (bench/common)
def test_runs_report_the_quickest_run_and_the_cpu_others_used_during_it():
    from bench.common import Runs

    runs = Runs()
    for seconds, others in ((3.0, 0.1), (1.0, 0.5), (2.0, 0.0)):
        runs.add(seconds, others)
    assert runs.best() == 1
    assert runs.summary() == {"min_s": 1.0, "median_s": 2.0, "runs_s": [3.0, 1.0, 2.0],
                              "others_cores_runs": [0.1, 0.5, 0.0], "others_cores_best": 0.5}


def test_runs_time_returns_the_result_and_counts_faults_only_when_asked():
    from bench.common import Runs

    plain, counted = Runs(), Runs(count_faults=True)
    assert plain.time(lambda: "done") == "done" and counted.time(lambda: [0] * 100_000) == [0] * 100_000
    assert len(plain.seconds) == len(counted.seconds) == 1
    assert "minor_faults_runs" not in plain.summary()
    assert len(counted.summary()["minor_faults_runs"]) == 1


def test_timers_make_the_calls_they_promise():
    import torch

    from bench.common import time_blocks, time_calls, warm_up

    cpu, calls = torch.device("cpu"), []

    def fn():
        calls.append(1)

    warm_up(fn, cpu, calls=3)
    assert len(calls) == 3
    calls.clear()
    assert len(time_calls(fn, cpu, reps=4, warmup=2)) == 4 and len(calls) == 6
    calls.clear()
    # No time asked for: the first call, one warm-up call, then min_blocks blocks of one call each.
    assert len(time_blocks(fn, cpu, run_time=0, min_blocks=3, block_time=0, warmup_time=0)) == 3
    assert len(calls) == 5


def test_committed_study_report_re_renders_from_its_json(tmp_path):
    """The study's report is rendered from its JSON alone: the committed JSON gives the committed markdown."""
    from bench.study_report import read_json, write_outputs

    committed = ROOT / "bench" / "results" / "study_cifar_subset"
    out = tmp_path / committed.name
    body = write_outputs(read_json(committed.with_suffix(".json")), out, None, json=False)
    assert out.with_suffix(".md").read_text() == committed.with_suffix(".md").read_text()
    assert body in committed.with_suffix(".md").read_text()
    assert not out.with_suffix(".json").exists()
    with Image.open(out.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.size == (640, 480)
