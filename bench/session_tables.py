"""Markdown tables of the GPU session's parts, one renderer per part, from the JSON record of that part."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .models import short_name
from .report import fmt, markdown_table


def items_of(part: Dict[str, Any]) -> List[tuple]:
    return [(spec, item) for spec, item in part.get("items", {}).items()]


def done_items(part: Dict[str, Any]) -> List[tuple]:
    return [(spec, item["result"]) for spec, item in items_of(part) if item.get("status") == "done"]


def render_capture(part: Dict[str, Any]) -> List[str]:
    rows = []
    for _, res in done_items(part):
        for name in ("plain", "capture", "paper"):
            v = res[name]
            rows.append([name, fmt(v["median_ms"]), fmt(v["ratio_vs_plain_paired"], ".3f"), v["n"],
                         fmt(v["peak_extra_mib"], ".0f")])
    return [markdown_table(["student step variant", "ms (median)", "vs plain (paired)", "reps", "peak extra MiB"],
                           rows)] if rows else []


def render_teacher(part: Dict[str, Any]) -> List[str]:
    rows = []
    for spec, res in done_items(part):
        by_keep = {k["keep"]: k for k in res["keeps"]}
        rows.append([short_name(spec), fmt(res["full"]["median_ms"])]
                    + [fmt(by_keep[k]["ratio_plugin_over_reference_paired"], ".3f") if k in by_keep else "n/a"
                       for k in (1.0, 0.75, 0.5, 0.25)]
                    + [fmt(by_keep[k]["plugin"]["median_ms"]) if k in by_keep else "n/a" for k in (0.5,)]
                    + [fmt(by_keep[0.5]["plugin_over_full"], ".3f") if 0.5 in by_keep else "n/a",
                       fmt(res["full"]["peak_extra_mib"], ".0f")])
    return [markdown_table(["teacher", "teacher(x) ms", "plugin/ref 1.0", "0.75", "0.5", "0.25", "plugin ms @0.5",
                            "@0.5 / full", "peak extra MiB (full)"], rows)] if rows else []


def render_distill(part: Dict[str, Any]) -> List[str]:
    rows = []
    for spec, res in done_items(part):
        v = res["variants"]
        rows.append([short_name(spec), fmt(v["full"]["median_ms"]), fmt(v["masked"]["median_ms"]),
                     fmt(v["ceiling"]["median_ms"]), f"{100 * res['saving_ours']:.1f}%",
                     f"{100 * res['saving_ceiling']:.1f}%", f"{res['gap_pp']:+.1f}",
                     fmt(v["full"]["peak_extra_mib"], ".0f"), fmt(v["masked"]["peak_extra_mib"], ".0f")])
    return [markdown_table(["teacher", "full ms", "MaskedKD ms", "ceiling ms", "saved", "ceiling saved", "gap pp",
                            "peak MiB full", "peak MiB masked"], rows)] if rows else []


def render_paper(part: Dict[str, Any]) -> List[str]:
    rows = []
    for spec, res in done_items(part):
        v = res["variants"]
        rows.append([short_name(spec), fmt(v["masked"]["median_ms"]), fmt(v["paper"]["median_ms"]),
                     fmt(res["speedup_ours_vs_paper"], ".3f"), fmt(v["masked"]["peak_extra_mib"], ".0f"),
                     fmt(v["paper"]["peak_extra_mib"], ".0f")])
    return [markdown_table(["teacher", "MaskedKD ms", "paper-code style ms", "ours vs paper x", "peak MiB ours",
                            "peak MiB paper"], rows)] if rows else []


def render_probe(part: Dict[str, Any]) -> List[str]:
    rows = []
    for spec, res in done_items(part):
        v = res["variants"]
        syncs = "/".join(fmt(v[n]["host_syncs_per_step"], "d") for n in ("off", "default", "every"))
        rows.append([short_name(spec), res["probe_every"], f"{100 * res['count']['share']:.2f}%",
                     fmt(v["off"]["median_ms"]), _ratio(res["ratio_between"]), _ratio(res["ratio_probing"]),
                     f"{100 * res['probe_part_amortised']:+.2f}%",
                     f"{res['overhead_amortised']:.4f} ({res['overhead_amortised_p25']:.4f}-"
                     f"{res['overhead_amortised_p75']:.4f})", syncs,
                     fmt(v["off"]["peak_extra_mib"], ".0f"), fmt(v["every"]["peak_extra_mib"], ".0f")])
    if not rows:
        return []
    return [markdown_table(["teacher", "every N", "probe tokens", "off ms", "between probes (p25-p75)",
                            "probing step (p25-p75)", "probe part", "amortised (p25-p75)",
                            "host syncs off/default/every", "peak MiB off", "peak MiB every"], rows), "",
            "Between / probing step: paired ratios against the probe off; amortised = ((N - 1) between + probing) / "
            "N; probe part = (probing - between) / N; probe tokens: meter.probe_tokens / meter.tokens over N "
            "consecutive teacher calls; host syncs: torch.cuda.set_sync_debug_mode warnings in one step."]


def _ratio(ratio: Optional[Dict[str, float]]) -> str:
    return "n/a" if ratio is None else f"{ratio['median']:.3f} ({ratio['p25']:.3f}-{ratio['p75']:.3f})"


def render_fast(part: Dict[str, Any]) -> List[str]:
    rows, lines = [], []
    for spec, res in done_items(part):
        for name, v in res["variants"].items():
            speedup = 1 / v["ratio_vs_eager_autocast_paired"] if v["ratio_vs_eager_autocast_paired"] else None
            rows.append([short_name(spec), name, fmt(v["median_ms"]), fmt(speedup, ".3f"),
                         fmt(v.get("tflops_2xmac"), ".1f"), fmt(_pct(v.get("fraction_of_matmul_ceiling"))),
                         fmt(v["peak_extra_mib"], ".0f")])
        c = res["compile"]
        lines.append(f"- {short_name(spec)}: compile {c.get('skipped') or fmt(c.get('first_call_s'), '.1f') + ' s'}"
                     + (f" (+{c['first_call_in_autocast_s']:.1f} s inside autocast)"
                        if "first_call_in_autocast_s" in c else "")
                     + f"; matmul ceiling {res['matmul_ceiling_tflops']}; check vs fp32 {res['check_vs_fp32_eager']}")
    if not rows:
        return []
    return [markdown_table(["teacher", "variant (keep 0.5)", "ms", "speed-up vs eager autocast", "TFLOP/s",
                            "of matmul peak", "peak extra MiB"], rows), ""] + lines


def _pct(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{100 * value:.1f}%"
