"""Results on disk: results.json (raw), report.md and PNG plots per scenario; SUMMARY.md over all."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.sampler import FIELDS
from bench.stats import Spread, fmt, fmt_ratio, fmt_spread, paired_ratios, spread

if TYPE_CHECKING:
    from bench.harness import Point, ScenarioRun

MIB = 1024 * 1024

# Scenario order of `python -m bench all` and of the summary.
ORDER = ("ceiling", "hostile", "instances", "naive", "workers", "policies", "seed", "pool", "startup", "soak", "mix",
         "context", "telemetry", "chaos")


# --- tables ----------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def group_points(points: list[Point]) -> OrderedDict[str, OrderedDict[str, list[Point]]]:
    """series -> label -> points, in the order they were measured."""
    groups: OrderedDict[str, OrderedDict[str, list[Point]]] = OrderedDict()
    for p in points:
        groups.setdefault(p.series, OrderedDict()).setdefault(p.label, []).append(p)
    return groups


def rps_by_repeat(points: list[Point]) -> list[float]:
    return [p.rps for p in sorted(points, key=lambda p: p.repeat)]


def cpu_by_repeat(points: list[Point]) -> list[float]:
    return [p.server_cpu_ms_per_request for p in sorted(points, key=lambda p: p.repeat)]


def cpu_cost_ratios(points: list[Point], baseline: list[Point]) -> Spread:
    """Per repeat: the baseline's server CPU per request over the candidate's. The capacity ratio on
    the same cores, and much less sensitive than req/s to whatever else runs on the machine."""
    return paired_ratios(cpu_by_repeat(baseline), cpu_by_repeat(points))


def variant_row(label: str, points: list[Point], baseline: list[Point] | None, baseline_label: str) -> list[str]:
    rps = spread([p.rps for p in points])
    if baseline is points:
        ratio = cpu_ratio = "1.00x (baseline)"
    elif baseline is None:
        ratio = cpu_ratio = "n/a"
    else:
        ratio = fmt_ratio(paired_ratios(rps_by_repeat(points), rps_by_repeat(baseline)))
        cpu_ratio = fmt_ratio(cpu_cost_ratios(points, baseline))
    lat = {q: spread([p.latency_ms[q] for p in points]).median for q in ("p50", "p95", "p99")}
    cpu = spread([p.server_cpu_ms_per_request for p in points]).median
    cores = spread([p.server_cpu_share for p in points]).median
    wrk = spread([p.wrk_cpu_share for p in points]).median
    other = spread([p.other_cpu_share for p in points]).median
    pss = spread([p.memory["pss"] / MIB for p in points]).median
    errors = sum(p.errors + p.non_2xx for p in points)
    return [label, fmt_spread(rps), ratio, cpu_ratio, fmt(lat["p50"], 2), fmt(lat["p95"], 2), fmt(lat["p99"], 2),
            fmt(cpu, 3), fmt(cores, 2), fmt(wrk, 2), fmt(other, 2), fmt(pss, 1), str(errors)]


THROUGHPUT_HEADER = ["variant", "req/s median (min-max)", "req/s ratio to baseline, paired by repeat",
                     "CPU-cost ratio (baseline CPU/req / CPU/req)", "p50 ms", "p95 ms",
                     "p99 ms", "server CPU ms/req", "server cores", "wrk cores", "other cores", "PSS after MiB",
                     "errors"]


def throughput_tables(run: ScenarioRun) -> list[tuple[str, str]]:
    baselines: dict[str, str] = run.data.get("baselines", {})
    out = []
    for series, labels in group_points(run.points).items():
        base_label = baselines[series] if series in baselines else next(iter(labels))
        base = labels.get(base_label) if base_label else None
        rows = [variant_row(label, pts, pts if label == base_label else base, base_label or "")
                for label, pts in labels.items()]
        title = f"{series} — baseline: {base_label}" if base_label else f"{series} — no baseline (see the text)"
        out.append((title, markdown_table(THROUGHPUT_HEADER, rows)))
    return out


def ratio_of(run: ScenarioRun, series: str, label: str, baseline: str) -> Spread:
    groups = group_points(run.points).get(series, {})
    if label not in groups or baseline not in groups:
        return spread([])
    return paired_ratios(rps_by_repeat(groups[label]), rps_by_repeat(groups[baseline]))


def cpu_ratio_of(run: ScenarioRun, series: str, label: str, baseline: str) -> Spread:
    groups = group_points(run.points).get(series, {})
    if label not in groups or baseline not in groups:
        return spread([])
    return cpu_cost_ratios(groups[label], groups[baseline])


def median_rps(run: ScenarioRun, series: str, label: str) -> Spread:
    return spread([p.rps for p in run.select(series=series, label=label)])


# --- plots -----------------------------------------------------------------------------------------

def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_timeline(run: ScenarioRun, path: Path) -> bool:
    """requests/s, latency, PSS/USS/RSS per process and CPU, on one time axis."""
    plt = _pyplot()
    if plt is None:
        return False
    samples = run.sampler.samples
    fig, axes = plt.subplots(6, 1, figsize=(12, 18), sharex=True)
    ax_rps, ax_lat, ax_pss, ax_uss, ax_rss, ax_cpu = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    labels = list(OrderedDict.fromkeys(p.label for p in run.points))
    label_color = {label: colors[i % len(colors)] for i, label in enumerate(labels)}
    seen: set[str] = set()
    for p in run.points:
        c = label_color[p.label]
        ax_rps.hlines(p.rps, p.t_start, p.t_end, colors=c, linewidth=3,
                      label=p.label if p.label not in seen else None)
        for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax_lat.hlines(p.latency_ms[q], p.t_start, p.t_end, colors=c, linestyles=style, linewidth=2,
                          label=f"{p.label} {q}" if p.label not in seen else None)
        seen.add(p.label)
    for i, (t0, t1, _label) in enumerate(run.data.get("unmeasured_spans", [])):
        for ax in (ax_rps, ax_lat):
            ax.axvspan(t0, t1, color="0.85", alpha=0.5, linewidth=0,
                       label="unmeasured warm-up" if i == 0 and ax is ax_rps else None)
    ax_rps.set_ylabel("requests/s")
    ax_lat.set_ylabel("latency ms (p50 — p95 -- p99 ··)")
    ax_lat.set_yscale("log")

    servers = list(OrderedDict.fromkeys(s.server for s in samples if s.server != "wrk"))
    server_color = {name: colors[i % len(colors)] for i, name in enumerate(servers)}
    for ax, attr in ((ax_pss, "pss"), (ax_uss, "uss"), (ax_rss, "rss")):
        for name in servers:
            procs: dict[int, list[tuple[float, float, str]]] = {}
            totals: dict[float, float] = {}
            for s in samples:
                if s.server != name:
                    continue
                procs.setdefault(s.pid, []).append((s.t, getattr(s, attr) / MIB, s.role))
                totals[s.t] = totals.get(s.t, 0.0) + getattr(s, attr) / MIB
            for series in procs.values():
                ts, vs, roles = zip(*series, strict=True)
                ax.plot(ts, vs, color=server_color[name], linewidth=0.8, alpha=0.6,
                        linestyle="--" if roles[0] == "master" else "-")
            if totals:
                ts = sorted(totals)
                ax.plot(ts, [totals[t] for t in ts], color=server_color[name], linewidth=2.2,
                        label=f"{name} total")
        ax.set_ylabel(f"{attr.upper()} MiB")
    ax_pss.set_title("per process: thin lines (master dashed), total per server: thick", fontsize=9)

    cpu_series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for s in samples:
        cpu_series.setdefault((s.server, s.pid), []).append((s.t, s.cpu_s))
    totals_cpu: dict[str, dict[float, float]] = {}
    for (name, _pid), series in cpu_series.items():
        for (t0, c0), (t1, c1) in itertools.pairwise(series):
            if t1 > t0:
                bucket = totals_cpu.setdefault(name, {})
                bucket[t1] = bucket.get(t1, 0.0) + (c1 - c0) / (t1 - t0)
    for name, values in totals_cpu.items():
        ts = sorted(values)
        ax_cpu.plot(ts, [values[t] for t in ts], label=name, linewidth=1.5,
                    color="black" if name == "wrk" else server_color.get(name))
    ax_cpu.set_ylabel("CPU (cores)")
    ax_cpu.set_xlabel("time since scenario start (s)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"bench {run.name}: {run.title}")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_fit(fit: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(fit["xs"], fit["ys"], label="measured")
    if not math.isnan(fit["slope"]):
        lo, hi = min(fit["xs"]), max(fit["xs"])
        ax.plot([lo, hi], [fit["intercept"] + fit["slope"] * lo, fit["intercept"] + fit["slope"] * hi],
                label=f"fit: {fit['slope']:.3g} {fit.get('slope_unit', '')} (r²={fit['r2']:.3f})")
    ax.set_xlabel(fit["x_label"])
    ax.set_ylabel(fit["y_label"])
    ax.set_title(fit["title"])
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_lines(lines: dict[str, Any], path: Path) -> bool:
    """Series against time, each on its own axis (e.g. workers and total PSS)."""
    plt = _pyplot()
    if plt is None:
        return False
    series = lines["series"]
    fig, axes = plt.subplots(len(series), 1, figsize=(10, 3 * len(series)), sharex=True, squeeze=False)
    for ax, (label, points) in zip(axes[:, 0], series.items(), strict=True):
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.step(xs, ys, where="post")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        for t, text in lines.get("marks", []):
            ax.axvline(t, color="0.5", linestyle="--", linewidth=1)
            if ax is axes[0, 0]:
                ax.annotate(text, (t, ax.get_ylim()[1]), fontsize=8, va="top", rotation=90)
    axes[-1, 0].set_xlabel(lines["x_label"])
    fig.suptitle(lines["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_comparison(comparison: dict[str, Any], path: Path) -> bool:
    """Panels of measured lines with reference figures beside them, on a log scale (they differ by orders of
    magnitude). A reference given as (x, low, high) is drawn as a range."""
    plt = _pyplot()
    if plt is None:
        return False
    panels = comparison["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, points in panel["measured"].items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
            for x, y in points:
                ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
        for label, points in panel["reference"].items():
            for point in points:
                x, low, high = point if len(point) == 3 else (point[0], point[1], point[1])
                ax.vlines(x, low, high, colors="tab:red", linewidth=6, alpha=0.6)
                ax.scatter([x], [(low + high) / 2], color="tab:red", marker="s", zorder=3)
                text = f"{low:,.0f}" if low == high else f"{low:,.0f}-{high:,.0f}"
                ax.annotate(text, (x, high), textcoords="offset points", xytext=(4, 2), fontsize=8)
            ax.scatter([], [], color="tab:red", marker="s", label=label)
        ax.set_yscale("log")
        ax.set_xlabel(panel["x_label"])
        ax.set_ylabel(panel["y_label"])
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(comparison["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_bars(bars: dict[str, Any], path: Path) -> bool:
    """Medians as bars with min-max whiskers."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(bars["labels"]))
    medians = bars["medians"]
    errors = [[m - lo for m, lo in zip(medians, bars["lows"], strict=True)],
              [hi - m for m, hi in zip(medians, bars["highs"], strict=True)]]
    ax.bar(xs, medians, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(list(xs), bars["labels"], rotation=20, ha="right")
    ax.set_ylabel(bars["y_label"])
    ax.set_title(bars["title"])
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# --- per-scenario files --------------------------------------------------------------------------

def write_scenario(run: ScenarioRun) -> None:

    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + list(out.glob("*.md")) + list(out.glob("*.json")):
        old.unlink()
    doc = {
        "scenario": run.name,
        "title": run.title,
        "description": run.description,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(run.started_wall)),
        "elapsed_s": round(getattr(run, "elapsed", 0.0), 1),
        "error": run.error,
        "machine": run.machine,
        "options": run.options.to_json(),
        "configs": run.configs,
        "servers": run.server_info,
        "workloads": {name: {"description": w.description, "requests_in_manifest": w.size,
                             "composition": w.composition, "preflight": w.expected}
                      for name, w in run.workloads.items()},
        "headlines": run.headlines,
        "notes": run.notes,
        "data": run.data,
        "events": run.events,
        "points": [p.to_json() for p in run.points],
        "sampling": {"interval_s": run.options.interval, "ticks": run.sampler.ticks,
                     "overrun_ticks": run.sampler.overrun},
        "sample_fields": list(FIELDS),
        "samples": [s.row() for s in run.sampler.samples],
    }
    dump_json(out / "results.json", doc, rows_key="samples")

    figures = []
    if run.sampler.samples and plot_timeline(run, out / "timeline.png"):
        figures.append(("timeline.png", "requests/s, latency and per-process memory and CPU over time"))
    for fit in run.data.get("fits", []):
        if plot_fit(fit, out / fit["file"]):
            figures.append((fit["file"], fit["title"]))
    for bars in run.data.get("bars", []):
        if plot_bars(bars, out / bars["file"]):
            figures.append((bars["file"], bars["title"]))
    for comparison in run.data.get("comparisons", []):
        if plot_comparison(comparison, out / comparison["file"]):
            figures.append((comparison["file"], comparison["title"]))
    for lines in run.data.get("lines", []):
        if plot_lines(lines, out / lines["file"]):
            figures.append((lines["file"], lines["title"]))
    (out / "report.md").write_text(render_report(run, figures))


def render_report(run: ScenarioRun, figures: list[tuple[str, str]]) -> str:
    m = run.machine
    o = run.options
    parts = [f"# bench `{run.name}`: {run.title}", "", run.description, ""]
    if run.error:
        parts += [f"**The scenario failed:** `{run.error}` (partial results below).", ""]
    parts += [
        f"Run {time.strftime('%Y-%m-%d %H:%M', time.localtime(run.started_wall))}, "
        f"{getattr(run, 'elapsed', 0.0):.0f} s. Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), "
        f"{m.get('memory_gib')} GiB; Python {m.get('python')}, wasmtime {m.get('wasmtime')}, "
        f"gunicorn {m.get('gunicorn')}, falcon {m.get('falcon')}; {m.get('wrk')}; load average at start "
        f"{m.get('load_average_at_start')}.",
        "",
        f"Load points: {o.duration:g} s each (after {o.warmup:g} s of unmeasured warm-up per server and "
        f"workload), {o.repeats} repeat(s) interleaved with the baseline, wrk {o.wrk_threads} thread / "
        f"{o.connections} keep-alive connections unless stated; servers: gunicorn with kwserver's "
        f"event-loop worker (kwserver/server/worker.py), {o.workers} workers unless stated; sampling every "
        f"{o.interval:g} s. The load generator shares the "
        "cores with the servers: its CPU is in the `wrk cores` column, and `other cores` is everything else "
        "that ran on the machine meanwhile (the harness itself, other users: a high value means a disturbed "
        "measurement). Ratios are computed per repeat against "
        "the baseline measured next to it, then summarised as median (min-max). The CPU-cost ratio compares the "
        "servers' CPU time per request instead (baseline / candidate): it is what the req/s ratio would be "
        "with the cores to themselves, and it hardly moves when other processes steal CPU.",
        "",
    ]
    if run.configs:
        parts += ["## Configurations", ""]
        for key, config in run.configs.items():
            flag = " **(fallback)**" if config.get("fallback") else ""
            parts.append(f"- `{key}`: {config['label']}, {config['policies']} policies{flag}")
        parts.append("")
    if run.headlines:
        parts += ["## Headline figures", "",
                  markdown_table(["figure", "value", "raw numbers"],
                                 [[h["figure"], h["value"], h["raw"]] for h in run.headlines]), ""]
    tables = throughput_tables(run)
    if tables:
        parts += ["## Throughput, latency, CPU and memory per load point", ""]
        for title, table in tables:
            parts += [f"### {title}", "", table, ""]
    for title, header, rows in run.tables:
        parts += [f"## {title}", "", markdown_table(header, rows), ""]
    if run.workloads:
        parts += ["## Workloads", ""]
        for name, w in run.workloads.items():
            parts.append(f"- `{name}`: {w.description}; {w.size} request(s) in the wrk manifest, cycled in order.")
            if w.composition:
                comp = w.composition
                parts.append(f"  - categories: {comp.get('by_category')}; per policy: {comp.get('by_policy')}")
            counts: dict[str, int] = {}
            for url_path, obj in w.entries:
                outcome = w.expected.get(f"{url_path} {obj}")
                if outcome:
                    counts[outcome] = counts.get(outcome, 0) + 1
            if counts:
                parts.append(f"  - answers in the manifest (preflight): {counts}")
        parts.append("")
    conn = [(p.label, p.series, p.repeat, sorted(p.connections.values(), reverse=True)) for p in run.points
            if p.connections]
    if conn:
        skewed = [c for c in conn if c[3] and min(c[3]) == 0]
        parts += ["## Connections per worker", "",
                  "Keep-alive connections stay with the worker that accepted them. Sampled maximum of "
                  "established connections per worker during each load point: "
                  + "; ".join(f"{label}/{series}#{r}: {v}" for label, series, r, v in conn[:12])
                  + (" …" if len(conn) > 12 else "") + ".", ""]
        if skewed:
            parts += [f"{len(skewed)} load point(s) left a worker without connections (idle worker).", ""]
    restarted = [p for p in run.points if p.extra.get("balance", {}).get("attempts", 1) > 1]
    if run.points and run.options.balance:
        parts += [f"Balance: {len(restarted)} of {len(run.points)} load points were restarted because wrk's "
                  "connections had left a worker idle, "
                  f"{sum(p.extra['balance']['attempts'] - 1 for p in restarted)} restarts in all"
                  + (": rejected distributions " + "; ".join(
                      str(p.extra["balance"]["rejected_distributions"]) for p in restarted[:8]) if restarted else "")
                  + ".", ""]
    if run.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in run.notes] + [""]
    if figures:
        parts += ["## Plots", ""] + [f"![{caption}]({name})" for name, caption in figures] + [""]
    parts += ["Raw data: `results.json` (options, machine, every load point with wrk's figures, the server's CPU "
              "and memory, and every resource sample).", ""]
    return "\n".join(parts)


# --- summary ---------------------------------------------------------------------------------------

def write_summary(results: Path, total_seconds: float | None = None) -> Path:
    """bench/results/SUMMARY.md from every scenario's results.json present."""
    rows = []
    runs = []
    for name in ORDER:
        path = results / name / "results.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        runs.append((name, doc))
        if doc.get("error"):
            rows.append([f"[{name}]({name}/report.md)", "**failed**", doc["error"], ""])
        for h in doc.get("headlines", []):
            rows.append([f"[{name}]({name}/report.md)", h["figure"], h["value"], h["raw"]])
    machine = runs[0][1]["machine"] if runs else {}
    lines = [
        "# kwserver bench summary",
        "",
        f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB, "
        f"Python {machine.get('python')}, wasmtime {machine.get('wasmtime')}, gunicorn {machine.get('gunicorn')}, "
        f"{machine.get('wrk')}.",
        "",
        "Every throughput figure is a ratio to a baseline measured in the same scenario run (median of the "
        "per-repeat ratios, min-max in brackets), with the raw requests/s beside it. Timings on a shared "
        "2-core machine vary ±20-30 % between runs: compare within a run.",
        "",
        markdown_table(["scenario", "figure", "value", "raw numbers"], rows) if rows else "(no results yet)",
        "",
        "| scenario | started | took | configs |",
        "|---|---|---|---|",
    ]
    for name, doc in runs:
        configs = "; ".join(
            f"{c['label']}" + (" (fallback)" if c.get("fallback") and "FALLBACK" not in c["label"] else "")
            for c in doc.get("configs", {}).values())
        lines.append(f"| {name} | {doc.get('started')} | {doc.get('elapsed_s')} s | {configs or '-'} |")
    if total_seconds is not None:
        lines += ["", f"`python -m bench all` took {total_seconds:.0f} s."]
    lines.append("")
    path = results / "SUMMARY.md"
    results.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def dump_json(path: Path, doc: Any, rows_key: str | None = None) -> None:
    """Indented JSON; the list under `rows_key` (if any) is written one compact row per line, last."""
    rows = doc.pop(rows_key, None) if rows_key else None
    text = json.dumps(doc, indent=1, default=_json_default)
    if rows is not None:
        body = ",\n".join(json.dumps(row, default=_json_default, separators=(",", ":")) for row in rows)
        text = text[:-2] + f',\n "{rows_key}": [\n{body}\n ]\n}}'
    path.write_text(text + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    if hasattr(value, "to_json"):
        return value.to_json()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
