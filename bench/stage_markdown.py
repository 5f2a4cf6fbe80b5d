"""The stage benchmark's markdown (bench/stage_report.py), rendered from its JSON-able result alone."""
from __future__ import annotations


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f}"


def markdown(res: dict) -> str:
    """The stage report's tables and sentences, rendered from its result (a run's or a saved JSON's)."""
    m, cs, ck = res["machine"], res["cam_stage"], res["checks"]
    BATCH, STEPS = res["config"]["batch"], res["config"]["steps"]  # noqa: N806 (the run's sizes, as the text names them)
    cnt = cs["counts"]
    c = ck["cam_stage"]

    def ms(d, k="min_s", f=".0f"):
        return format(1e3 * d[k], f)

    def oth(d):
        return f"{d['others_cores_best']:.2f}"

    def mb(counts):
        return _mb(counts["bytes_read"] + counts["bytes_written"])

    la = lambda k: f"{m[k][0]:.1f}"
    lines = [
        (f"{m['cpu']} ({m['logical_cores']} cores, {m['cpu_capability']}), torch {m['torch']}, {m['torch_threads']} threads, "
         f"float32, no GPU, {m['date']}; torchattacks {m['torchattacks']}, matplotlib {m['matplotlib']}, Pillow {m['pillow']}, "
         f"numpy {m['numpy']}; malloc: {m.get('malloc', 'system default')}. Total {m['total_seconds']:.0f} s, "
         f"{m['waited_for_quiet_s']:.0f} s of it waiting for quiet."),
        (f"Load average (1 min) at start / after the CAM stage / at the end: {la('load_average_before')} / "
         f"{la('load_average_after_cam_stage')} / {la('load_average_after')} (the later two include this run's own 2 threads). Every figure is the quickest of its runs; "
         "\"others\" = CPU cores other processes used during that run (/proc/stat; 0 = quiet machine, 2 = both cores taken)."),
        (f"ResNet-18, batch {BATCH}, 32×32, {res['model']['data']}; {res['model']['setup']} "
         f"(test accuracy {res['model']['test_accuracy']:.2f}, degenerate CAMs {res['model']['degenerate_cams']}/{BATCH})."),
        "",
        "### CAM + budget stage (GradCAM at layer4, jet mask, eps 8/255, eps_low 7/255)",
        "",
        "| impl | ms / batch | median ms | others | aten ops / batch | operand MB / batch | × release |",
        "|---|---:|---:|---:|---:|---:|---:|",
        (f"| release, emulated: per image fwd + full bwd (torchcam-style GradCAM), PIL bicubic, matplotlib jet, numpy z-score "
         f"| {ms(cs['release'])} | {ms(cs['release'], 'median_s')} | {oth(cs['release'])} "
         f"| {cnt['release_per_batch']['ops']:,} ({cnt['release_per_image']['ops']}/image) | {mb(cnt['release_per_batch'])} | 1.0 |"),
        (f"| ↳ its host part alone (PIL + matplotlib + numpy + copy back, {BATCH} images) | {ms(cs['release_host_part'])} "
         f"| {ms(cs['release_host_part'], 'median_s')} | {oth(cs['release_host_part'])} | — | — | — |"),
        (f"| **part_fast** `PixelBudget(mask=\"jet\")(model, x)` | {ms(cs['ours'])} | {ms(cs['ours'], 'median_s')} | {oth(cs['ours'])} "
         f"| {cnt['ours_per_batch']['ops']} | {mb(cnt['ours_per_batch'])} | **{cs['speedup']:.1f}** |"),
        (f"| ↳ `compute_cam` (one batched eval forward + head-only grad) | {ms(cs['ours_compute_cam'])} "
         f"| {ms(cs['ours_compute_cam'], 'median_s')} | {oth(cs['ours_compute_cam'])} | {cnt['ours_compute_cam_per_batch']['ops']} "
         f"| {mb(cnt['ours_compute_cam_per_batch'])} | — |"),
    ]
    if cs["ours_cam_eps_map_cpu"]:
        lines.append(f"| ↳ `cam_eps_map`, cpu backend (one fused op) | {ms(cs['ours_cam_eps_map_cpu'], f='.2f')} "
                     f"| {ms(cs['ours_cam_eps_map_cpu'], 'median_s', '.2f')} | {oth(cs['ours_cam_eps_map_cpu'])} | 1 | — | — |")
    lines += [
        (f"| `cam_eps_map`, reference backend (comparison) | {ms(cs['reference_cam_eps_map'], f='.2f')} "
         f"| {ms(cs['reference_cam_eps_map'], 'median_s', '.2f')} | {oth(cs['reference_cam_eps_map'])} | — | — | — |"),
        "",
        (f"Masks ({c['mask_elements']:,} elements): **{c['mask_mismatch_on_release_cams']} differ** when `cam_eps_map` is fed the "
         f"release's own per-image CAMs (the post-CAM pipeline is exact); end to end {c['mask_mismatch_end_to_end']} differ "
         f"({c['images_with_mismatch_end_to_end']} images), from the CAMs themselves: batched vs per-image forward max |ΔCAM| = "
         f"{c['max_abs_diff_batched_vs_per_image_cam']:.1e}, predicted class differs for {c['predicted_class_differs_batched_vs_per_image']} images. "
         f"{100 * c['eps_fraction_high']:.1f}% of elements get eps. Parameter `.grad` tensors left by the release's loop: "
         f"{c['parameter_grads_left_by_release_loop']}; by ours: {c['parameter_grads_left_by_ours']}."),
        "",
        f"### PGD-{STEPS} (eps 8/255, step 2/255, start at x, batch {BATCH}, CE loss)",
        "",
        "| attack | eps | s / run | median s | others | minor faults | images/s | update share |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["pgd"]["attacks"]:
        lines.append(f"| {r['impl']} | {r['eps']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['others_cores_best']:.2f} "
                     f"| {r.get('minor_faults_best', 0):,} | {r['images_per_s']:.2f} | {r['update_share_pct']:.2f}% |")
    lines += ["", (f"Update phase alone ({STEPS} calls on a real iterate and gradient, {BATCH}×3×32×32; the x.clone() each "
              f"repetition starts from ({1e3 * res['pgd']['clone_s']:.3f} ms) is subtracted):"), "",
              f"| update | eps | ms / {STEPS} calls | others | aten ops / {STEPS} calls | × fused |", "|---|---|---:|---:|---:|---:|"]
    for u in res["pgd"]["update_phase"]:
        lines.append(f"| {u['impl']} | {u['eps']} | {1e3 * u['ten_calls_s']:.3f} | {u['others_cores_best']:.2f} "
                     f"| {u['aten_ops_10_calls']} | {u['slower_than_fused']:.1f} |")
    one, e2e = ck["pgd_one_update_same_iterate"], ck["pgd_end_to_end"]
    fmt = lambda d: f"max |Δ| {d['max_abs_diff']:.1e} ({d['elements_differing']} elements)"
    lines += ["", "One update from the same iterate and gradient: fused vs release chain "
              f"{fmt(one['fused_vs_release_update_map'])} (map), {fmt(one['fused_vs_release_update_scalar'])} (scalar); "
              f"fused vs torchattacks' update {fmt(one['fused_vs_torchattacks_update_scalar'])}; fused vs reference backend "
              f"{fmt(one['fused_vs_reference_backend_map'])}. After {STEPS} steps those float32-rounding differences have flipped "
              f"near-zero gradient signs and the trajectories part: fused vs release update {fmt(e2e['fused_vs_release_update_map'])} "
              f"in {e2e['fused_vs_release_update_map']['images_differing']} images (map)"
              + (f"; release update vs torchattacks {fmt(e2e['release_update_vs_torchattacks_scalar'])}" if "release_update_vs_torchattacks_scalar" in e2e else "")
              + f". Fused run inside its budget: {e2e['fused_map_within_budget']}.",
              "", (f"Whole PGD runs of one attack varied by {res['pgd']['run_spread_pct_median']:.1f}% (median max/min − 1) on this "
                   f"machine. \"derived\" = (model part {res['pgd']['model_part_s']:.2f} s, the same in every loop, + each loop's own "
                   "update-phase time) ratio: what the update alone changes."),
              "", "| target | measured | derived | goal | met |", "|---|---:|---:|---:|---|"]
    for t in res["targets"]:
        value = f"{t['value']}" if t["op"] == "=" else f"{t['value']:.2f}"
        derived = f"{t['derived']:.4f}" if "derived" in t else "—"
        lines.append(f"| {t['target']} | {value} | {derived} | {t['op']} {t['goal']:g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)
