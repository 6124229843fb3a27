"""The Markdown table of a benchmark result (printed by ``python -m bench`` and pasted into the docs)."""

from __future__ import annotations

from typing import Any

_AMP_NAMES = {"off": "fp32 (amp off)", "bf16": "amp bf16", "fp16": "amp fp16"}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _mem(res: dict[str, Any], key: str, cuda: bool) -> list[str]:
    m = res.get("measurements", {}).get(key, {})
    cells = [f"{m['peak_rss_mb']:,.0f}" if "peak_rss_mb" in m else "-"]
    if cuda:
        cells.append(f"{m['peak_cuda_mb']:,.0f}" if "peak_cuda_mb" in m else "-")
    return cells


def _step(seconds: float | None, batch: int = 1) -> str:
    if seconds is None:
        return "failed (see JSON)"
    text = f"{seconds:.3f} s/step ({1.0 / seconds:.2f} steps/s)"
    if batch > 1:
        text += f", {seconds / batch:.3f} s/episode"
    return text


def format_table(res: dict[str, Any]) -> str:
    """One row per measurement: what, result, peak RSS (and peak CUDA memory on GPU runs)."""
    meta = res.get("meta", {})
    cuda = "peak_cuda_mb" in res
    head = ["measurement", "result", "peak RSS (MB)"] + (["peak CUDA (MB)"] if cuda else [])
    rows = [_row(head), _row(["---"] * len(head))]
    models = meta.get("config", {}).get("models", {})
    for name, by_amp in res.get("train_step_s", {}).items():
        backbone, size = models.get(name, ("?", 0))
        for amp, seconds in by_amp.items():
            what = f"train step, {name} ({backbone}, {size}x{size}, 1-shot), {_AMP_NAMES.get(amp, amp)}"
            rows.append(_row([what, _step(seconds)] + _mem(res, f"train_step.{name}.amp={amp}", cuda)))
    for name, by_option in res.get("train_options_s", {}).items():
        for option, seconds in by_option.items():
            key = f"train_step.{name}.{option}"
            batch = res.get("measurements", {}).get(key, {}).get("batch_size", 1)
            rows.append(_row([f"train step, {name}, {option}", _step(seconds, batch)] + _mem(res, key, cuda)))
    for workers, rate in res.get("loop_steps_per_s", {}).items():
        m = res.get("measurements", {}).get(f"loop.workers={workers}", {})
        rows.append(_row([f"training loop overhead (one-layer encoder, {m.get('input_size', 64)}x"
                          f"{m.get('input_size', 64)}, {workers} DataLoader workers)",
                          f"{rate:.1f} steps/s ({m.get('steps_per_cpu_s', float('nan')):.1f} per CPU-second)"]
                         + _mem(res, f"loop.workers={workers}", cuda)))
    if "train_step_ratio_legacy_vs_new" in res:
        m = res["measurements"]["train_step.paper.legacy_vs_new"]
        rows.append(_row([f"train step, paper, before vs after the host-sync-free step ({m['backbone']}, amp off, "
                          "alternated)",
                          f"{m['legacy_s']:.3f} s vs {m['new_s']:.3f} s: {res['train_step_ratio_legacy_vs_new']:.2f}x "
                          f"(CPU time: {m.get('cpu_ratio', float('nan')):.2f}x)"]
                         + _mem(res, "train_step.paper.legacy_vs_new", cuda)))
    for workers, rate in res.get("episodes_per_s", {}).items():
        rows.append(_row([f"episode pipeline alone, {workers} DataLoader workers", f"{rate:.1f} episodes/s"]
                         + _mem(res, f"pipeline.workers={workers}", cuda)))
    if "eval_s" in res:
        fast = res["measurements"].get("eval.fast", {})
        scope = f"{len(fast.get('queries', []))} query scans x 4 classes, {fast.get('scored_slices', '?')} slices"
        for path, key in (("fast", "eval_s"), ("naive (original)", "eval_naive_s")):
            m = res["measurements"].get(f"eval.{path.split()[0]}", {})
            rows.append(_row([f"evaluation, one phantom fold ({res.get('eval_model')}; {scope}), {path}",
                              f"{res[key]:.2f} s ({m.get('images_encoded', '?')} images encoded)"]
                             + _mem(res, f"eval.{path.split()[0]}", cuda)))
        same = "same Dice" if res.get("eval_same_dice") else "DICE DIFFERS"
        rows.append(_row(["evaluation speed-up vs naive", f"{res['eval_speedup_vs_naive']:.2f}x ({same})"]
                         + [""] * (len(head) - 2)))
    for name, seconds in res.get("predict_s", {}).items():
        m = res.get("measurements", {}).get(f"predict.{name}", {})
        z, h, w = m.get("query_shape", ("?", "?", "?"))
        cells = [f"predict.py end to end, one {h}x{w}x{z} CT query, {name} ({m.get('backbone', '?')})",
                 f"{seconds:.1f} s (in-process {m.get('predict_elapsed_s', float('nan')):.1f} s)",
                 f"{res['predict_peak_rss_mb'][name]:,.0f} (predict.py process)"]
        rows.append(_row(cells + (["-"] if cuda else [])))
    for workers, s100 in res.get("pseudolabel_s_per_100_slices", {}).items():
        rows.append(_row([f"pseudolabels, {workers} worker(s)", f"{s100:.2f} s per 100 slices"]
                         + _mem(res, f"pseudolabels.workers={workers}", cuda)))
    if "pseudolabel_speedup" in res:
        rows.append(_row([f"pseudolabel speed-up, {res.get('pseudolabel_workers_all')} workers vs 1",
                          f"{res['pseudolabel_speedup']:.2f}x"] + [""] * (len(head) - 2)))
    return "\n".join(rows)


def describe_machine(res: dict[str, Any]) -> str:
    """One line: date, commit, device, CPU, cores, torch, load averages, wall time."""
    meta = res.get("meta", {})
    device = meta.get("gpu") or meta.get("cpu", "?")
    commit = (meta.get("git_commit") or "unknown")[:7] + (" + uncommitted changes" if meta.get("git_dirty") else "")
    return (f"{meta.get('date', '?')}, commit {commit}; "
            f"{meta.get('device', '?')}: {device}; {meta.get('cpu_count', '?')} CPU cores "
            f"({meta.get('torch_threads', '?')} torch threads); torch {meta.get('torch', '?')}; "
            f"load average {meta.get('load_avg_start')} at start, {meta.get('load_avg_end')} at end; "
            f"{'--quick, ' if meta.get('quick') else ''}{meta.get('wall_s', '?')} s in total")
