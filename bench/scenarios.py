"""The scenarios of `python -m bench <scenario>`; each writes bench/results/<scenario>/."""

from __future__ import annotations

import importlib.util
import math
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench import workloads as wl
from bench.harness import MIB, ScenarioRun
from bench.hostile import StalledClients, StalledCounts
from bench.report import ratio_of
from bench.sampler import snapshot
from bench.stats import fmt, fmt_ratio, fmt_spread, linear_fit, spread
from bench.steps import (
    check_outcomes,
    config_dir,
    interleaved,
    plain_policies,
    pod_privileged_policy,
    pod_workloads,
    ratio_headline,
    scenario,
    single_config,
    sixty_one_policy_config,
    ten_policy_config,
    workdir,
)

KIB = 1024


# --- 1. ceiling ------------------------------------------------------------------------------------

CANNED = "canned (ceiling)"  # the canned app on kwserver's own HTTP stack
CANNED_GTHREAD = "canned on gthread (before)"
CANNED_UVICORN = "canned on uvicorn-worker"
CEILING_BEFORE_COMMIT = "4ecc251"
KWSERVER_BEFORE = f"kwserver accept at {CEILING_BEFORE_COMMIT}"


@scenario("ceiling", "kwserver vs the HTTP ceiling",
          "The HTTP ceiling is a minimal falcon app (bench/canned.py) answering a canned AdmissionReview; it "
          "reads the request body and returns fixed bytes. It runs on three HTTP stacks, each under gunicorn "
          "with the same workers and keep-alive: kwserver's event-loop worker (the ceiling), gunicorn's "
          "gthread worker with one thread (kwserver's stack before it), and falcon's ASGI app on "
          "uvicorn-worker (the candidate measured beside it; left out when uvicorn-worker is not installed). "
          "kwserver serves `/validate/pod-privileged` (tests/policies/pod-privileged.wasm) with the ~5 KB pods "
          "of the reference server's tests: one accepted (no privileged container), one rejected. Plain HTTP "
          f"and TLS with keep-alive. Beside them, kwserver as of commit {CEILING_BEFORE_COMMIT} (the server the "
          "issue of the leaner request path measured, run from a `git archive` of it) on the accepted pod.")
def ceiling(run: ScenarioRun) -> None:
    o = run.options
    config = single_config(run)
    accept, reject = pod_workloads(workdir(run, "ceiling"))
    stacks = {CANNED: "event-loop", CANNED_GTHREAD: "gthread"}
    if importlib.util.find_spec("uvicorn_worker") is not None:
        stacks[CANNED_UVICORN] = "uvicorn"
    else:
        run.notes.append("uvicorn-worker is not installed (pip install -e '.[bench]'): its stack was not measured.")
    run.data["baselines"] = {}
    before = run.checkout(CEILING_BEFORE_COMMIT)
    if before is None:
        run.notes.append(f"The commit {CEILING_BEFORE_COMMIT} is not in this checkout's history: not measured.")
    for transport in o.transports:
        tls = transport == "https"
        canned = {label: run.canned(f"canned-{stack}-{transport}", tls=tls, stack=stack)
                  for label, stack in stacks.items()}
        kw = run.kwserver(f"kwserver-{transport}", config, tls=tls)
        check_outcomes(run, kw, accept, "accept")
        check_outcomes(run, kw, reject, "reject")
        plan = [*((server, reject, label, transport) for label, server in canned.items()),
                (kw, accept, "kwserver accept", transport), (kw, reject, "kwserver reject", transport)]
        servers = [*canned.values(), kw]
        if before is not None:
            kw_before = run.kwserver(f"kwserver-before-{transport}", config, tls=tls, env={"PYTHONPATH": str(before)})
            check_outcomes(run, kw_before, accept, "accept")
            plan.append((kw_before, accept, KWSERVER_BEFORE, transport))
            servers.append(kw_before)
        for server, workload, _, _ in plan:
            run.warmup(server, workload)
        run.data["baselines"][transport] = CANNED
        interleaved(run, plan, o.repeats)
        for server in servers:
            run.stop(server)
        if before is not None:
            ratio_headline(run, f"{transport}, accept: kwserver / kwserver at {CEILING_BEFORE_COMMIT}", transport,
                           "kwserver accept", KWSERVER_BEFORE, transport=transport, outcome="accept")
        for outcome in ("accept", "reject"):
            ratio_headline(run, f"ceiling ratio, {transport}, {outcome} (kwserver / canned)", transport,
                           f"kwserver {outcome}", CANNED, transport=transport, outcome=outcome)
            ratio_headline(run, f"{transport}, {outcome}: kwserver / canned on gthread (before)", transport,
                           f"kwserver {outcome}", CANNED_GTHREAD, transport=transport, outcome=outcome)
        if CANNED_UVICORN in canned:
            ratio_headline(run, f"{transport}: canned on kwserver's worker / on uvicorn-worker", transport,
                           CANNED, CANNED_UVICORN, transport=transport)


# --- 1b. hostile ----------------------------------------------------------------------------------

STALLED_COUNTS = (10, 100, 1000)


@scenario("hostile", "normal traffic while clients stall",
          "kwserver over TLS serves `/validate/pod-privileged` (the 5.4 KB accepted Pod) to wrk while N other "
          "connections stall (N = 0, 10, 100, 1,000): a third send half a request header, a third a request "
          "whose body never comes, a third open TCP to the TLS port and never send a ClientHello "
          "(bench/hostile.py; a connection the server closes on its timeouts is opened again at once). "
          "Requests/s and p99 latency as ratios to the same server with no stalled connection, interleaved "
          "repeat by repeat, and failed requests (socket errors and non-2xx answers).")
def hostile(run: ScenarioRun) -> None:
    o = run.options
    config = single_config(run)
    accept, _ = pod_workloads(workdir(run, "hostile"))
    kw = run.kwserver("kwserver-https", config, tls=True)
    check_outcomes(run, kw, accept, "accept")
    run.warmup(kw, accept)
    series, baseline = "https", "0 stalled"
    run.data["baselines"] = {series: baseline}
    held: dict[int, list[StalledCounts]] = {n: [] for n in STALLED_COUNTS}
    for repeat in range(o.repeats):
        run.load(kw, accept, label=baseline, series=series, repeat=repeat)
        for count in STALLED_COUNTS:
            with StalledClients(kw.port, count, tls=True) as stalled:
                run.load(kw, accept, label=f"{count} stalled", series=series, repeat=repeat,
                         extra={"stalled": count})
            held[count].append(stalled.counts)
    run.stop(kw)
    base_p99 = spread([p.latency_ms["p99"] for p in run.select(series=series, label=baseline)]).median
    rows = []
    for count in STALLED_COUNTS:
        label = f"{count} stalled"
        points = run.select(series=series, label=label)
        p99 = spread([p.latency_ms["p99"] for p in points]).median
        failed = sum(p.errors + p.non_2xx for p in points)
        rps = ratio_of(run, series, label, baseline)
        p99_ratio = p99 / base_p99 if base_p99 else math.nan
        run.headline(f"hostile, {count} stalled connections: req/s and p99 vs none",
                     f"req/s {fmt_ratio(rps)}; p99 {p99_ratio:.2f}x; {failed} failed",
                     f"p99 {fmt(p99, 2)} vs {fmt(base_p99, 2)} ms", stalled=count, rps_ratio=rps.median,
                     p99_ratio=p99_ratio, failed=failed)
        counts = held[count]
        rows.append([str(count), fmt_ratio(rps), f"{p99_ratio:.2f}x", str(failed),
                     str(sum(c.opened for c in counts)), str(sum(c.reopened for c in counts)),
                     str(sum(c.failed for c in counts))])
    run.tables.append(("Stalled connections held during each load point",
                       ["stalled", "req/s vs none", "p99 vs none", "failed requests", "stalled opened",
                        "closed by the server and reopened", "could not open"], rows))


# --- 2. instances ----------------------------------------------------------------------------------

@scenario("instances", "reused instances vs a fresh instance per request",
          "The same kwserver and config twice: `KWSERVER_FRESH_INSTANCE_PER_REQUEST=false` (instances are reused "
          "per worker and module) and `=true` (every evaluation starts from a new instance's state: pre-initialised "
          "waPC modules are put back into it after each evaluation, other modules get a new instance; the default "
          "when unset does so for the modules where it is that cheap: all of this config's). Two workloads: "
          "one policy (pod-privileged, the 5.4 KB accepted Pod) and the realistic mix fanned out over the "
          "ten-policy config. Plain HTTP and TLS with keep-alive.")
def instances(run: ScenarioRun) -> None:
    o = run.options
    ten = ten_policy_config(run)
    policy = pod_privileged_policy(ten.path)
    d = workdir(run, "instances")
    one = wl.single_request(d, "one-policy", policy, wl.POD_UNPRIVILEGED, f"5.4 KB Pod to `{policy}`")
    mix = wl.mix_workload(d, "ten-policy-mix", ten.path, "realistic mix over the ten-policy config")
    run.data["baselines"] = {}
    for transport in o.transports:
        tls = transport == "https"
        reuse = run.kwserver(f"reuse-{transport}", ten.path, tls=tls,
                             env={"KWSERVER_FRESH_INSTANCE_PER_REQUEST": "false"})
        fresh = run.kwserver(f"fresh-{transport}", ten.path, tls=tls,
                             env={"KWSERVER_FRESH_INSTANCE_PER_REQUEST": "true"})
        for server in (reuse, fresh):
            check_outcomes(run, server, one)
            run.preflight(server, mix)
            run.warmup(server, one)
            run.warmup(server, mix)
        s1, s10 = f"{transport} one policy", f"{transport} ten-policy mix"
        run.data["baselines"][s1] = run.data["baselines"][s10] = "reuse"
        interleaved(run, [(reuse, one, "reuse", s1), (fresh, one, "fresh", s1),
                          (reuse, mix, "reuse", s10), (fresh, mix, "fresh", s10)], o.repeats)
        run.stop(reuse)
        run.stop(fresh)
        ratio_headline(run, f"fresh/reuse ratio, {transport}, one policy", s1, "fresh", "reuse")
        ratio_headline(run, f"fresh/reuse ratio, {transport}, ten-policy mix", s10, "fresh", "reuse")


# --- 3. naive --------------------------------------------------------------------------------------

@scenario("naive", "kwserver vs the naive design",
          "The naive baseline (bench/naive.py): no preload, every worker compiles its modules itself, a new "
          "Store and `Linker.instantiate` per request (no InstancePre, no compile cache, no instance reuse), "
          "waPC host functions over wasmtime-py's public API; request parsing and responses are kwserver's "
          "own code, so only the wasm execution design differs. Same policies (the plain policies of the "
          "ten-policy config) and workloads as `instances`. Plain HTTP and TLS with keep-alive.")
def naive(run: ScenarioRun) -> None:
    o = run.options
    ten = ten_policy_config(run)
    policy = pod_privileged_policy(ten.path)
    d = workdir(run, "naive")
    one = wl.single_request(d, "one-policy", policy, wl.POD_UNPRIVILEGED, f"5.4 KB Pod to `{policy}`")
    only = plain_policies(ten.path)
    mix = wl.mix_workload(d, "ten-policy-mix", ten.path, "realistic mix over the plain policies of the "
                          "ten-policy config", only=only)
    run.data["baselines"] = {}
    for transport in o.transports:
        tls = transport == "https"
        nv = run.naive(f"naive-{transport}", ten.path, tls=tls)
        kw = run.kwserver(f"kwserver-{transport}", ten.path, tls=tls)
        run.data.setdefault("ready_after_s", {})[transport] = {"naive": nv.ready_after_s,
                                                               "kwserver (warm cache)": kw.ready_after_s}
        answers = {}
        for server in (nv, kw):
            check_outcomes(run, server, one)
            run.preflight(server, mix)
            answers[server.kind] = dict(mix.expected)
            run.warmup(server, one)
            run.warmup(server, mix)
        differ = {k: (v, answers["kwserver"].get(k)) for k, v in answers["naive"].items()
                  if answers["kwserver"].get(k) != v}
        run.data.setdefault("answers_differ", {})[transport] = differ
        if differ:
            run.notes.append(f"{transport}: the naive server answers {len(differ)} request kind(s) differently "
                             f"from kwserver (naive, kwserver), e.g. {next(iter(differ.items()))}")
        s1, s10 = f"{transport} one policy", f"{transport} ten-policy mix"
        run.data["baselines"][s1] = run.data["baselines"][s10] = "naive"
        interleaved(run, [(nv, one, "naive", s1), (kw, one, "kwserver", s1),
                          (nv, mix, "naive", s10), (kw, mix, "kwserver", s10)], o.repeats)
        run.stop(nv)
        run.stop(kw)
        ratio_headline(run, f"kwserver/naive ratio, {transport}, one policy", s1, "kwserver", "naive")
        ratio_headline(run, f"kwserver/naive ratio, {transport}, ten-policy mix", s10, "kwserver", "naive")
    times = run.data["ready_after_s"]
    run.tables.append(("Time to ready (spawn to all workers serving)", ["transport", "naive s", "kwserver s"],
                       [[t, fmt(v["naive"], 2), fmt(v["kwserver (warm cache)"], 2)] for t, v in times.items()]))


# --- 4. workers ------------------------------------------------------------------------------------

@scenario("workers", "memory and throughput vs worker count",
          "kwserver with the ten-policy config and 1, 2, 4 and 8 workers, one server at a time (PSS splits "
          "shared pages among every process mapping them, so servers must not overlap). Each server gets an "
          "unmeasured warm-up with 4 connections per worker so that every worker has instances of every "
          "policy (short rounds until each worker has had connections), then the realistic mix with "
          "max(8, 2xworkers) connections. Memory: total PSS (master + "
          "workers) right after each load point; the slope of a linear fit is the cost of one more worker.")
def workers(run: ScenarioRun) -> None:
    o = run.options
    ten = ten_policy_config(run)
    d = workdir(run, "workers")
    mix = wl.mix_workload(d, "ten-policy-mix", ten.path, "realistic mix over the ten-policy config")
    run.data["baselines"] = {"ten-policy mix": f"{o.worker_counts[0]} worker(s)"}
    xs, ys, uss = [], [], []
    rows = []
    for count in o.worker_counts:
        server = run.kwserver(f"kwserver-{count}w", ten.path, workers=count)
        time.sleep(0.5)
        idle = [s.uss / MIB for s in snapshot(server.name, server.pid) if s.role == "worker"]
        run.preflight(server, mix)
        run.warm_every_worker(server, mix, connections=4 * count)
        points = [run.load(server, mix, label=f"{count} worker(s)", series="ten-policy mix", repeat=r,
                           connections=max(o.connections, 2 * count)) for r in range(o.repeats)]
        run.stop(server)
        pss = statistics.median(p.memory["pss"] for p in points) / MIB
        uss_total = statistics.median(p.memory["uss"] for p in points) / MIB
        worker_uss = [proc["uss"] / MIB for p in points[-1:] for proc in p.memory["processes"]
                      if proc["role"] == "worker"]
        master = [proc["pss"] / MIB for proc in points[-1].memory["processes"] if proc["role"] == "master"]
        xs.append(count)
        ys.append(pss)
        uss.append(uss_total)
        rows.append([str(count), fmt(pss, 1), fmt(uss_total, 1), fmt(master[0] if master else math.nan, 1),
                     fmt(statistics.median(idle) if idle else math.nan, 1),
                     fmt(statistics.median(worker_uss) if worker_uss else math.nan, 1),
                     fmt_spread(spread([p.rps for p in points]))])
    fit = linear_fit(xs, ys)
    fit_uss = linear_fit(xs, uss)
    run.tables.append(("Memory per worker count (after load)",
                       ["workers", "total PSS MiB", "total USS MiB", "master PSS MiB",
                        "median worker USS before any request, MiB", "median worker USS after load, MiB",
                        "req/s"], rows))
    run.data["fits"] = [{"file": "pss_vs_workers.png", "title": "total PSS vs workers (ten-policy config)",
                         "x_label": "workers", "y_label": "total PSS (MiB)", "xs": xs, "ys": ys,
                         "slope_unit": "MiB/worker", **fit.to_json()}]
    run.data["pss_fit"] = fit.to_json()
    run.data["uss_fit"] = fit_uss.to_json()
    raw = ", ".join(f"{x}w: {y:.1f} MiB" for x, y in zip(xs, ys, strict=True))
    run.headline("per-worker PSS slope (linear fit of total PSS)", f"{fit.slope:.2f} MiB/worker",
                 f"{raw}; r²={fit.r2:.3f}; USS slope {fit_uss.slope:.2f} MiB/worker",
                 slope_mib=fit.slope, r2=fit.r2, intercept_mib=fit.intercept)
    base = f"{o.worker_counts[0]} worker(s)"
    for count in o.worker_counts[1:]:
        ratio_headline(run, f"req/s with {count} workers / {o.worker_counts[0]}", "ten-policy mix",
                       f"{count} worker(s)", base)


# --- 5. policies -----------------------------------------------------------------------------------

def memory_point(run: ScenarioRun, name: str, choice: wl.ConfigChoice, mix: wl.Workload, workers: int,
                 label: str, series: str) -> Any:
    """One server alone (PSS splits pages among every process mapping them): every worker warmed on every
    policy of the mix, then one measured load point; the server is stopped after it."""
    server = run.kwserver(name, choice.path, workers=workers)
    try:
        run.preflight(server, mix)
        run.warm_every_worker(server, mix, connections=max(16, 4 * workers))
        return run.load(server, mix, label=label, series=series,
                        connections=max(run.options.connections, 2 * workers, 16))
    finally:
        run.stop(server)


def own_instance_config(choice: wl.ConfigChoice, directory: Path) -> wl.ConfigChoice:
    """`choice` with `ownInstance: true` on every policy: an instance per policy in every worker, as before
    instances were shared per module."""
    doc = yaml.safe_load(choice.path.read_text())
    base = choice.path.resolve().parent

    def own(entry: dict[str, Any]) -> None:
        module = str(entry.get("module", ""))
        if module and "://" not in module and not Path(module).is_absolute() and (base / module).exists():
            entry["module"] = str(base / module)
        entry["ownInstance"] = True

    for entry in doc.values():
        if "module" in entry:
            own(entry)
        for member in (entry.get("policies") or {}).values():
            own(member)
    path = directory / f"own-{choice.path.name}"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return wl.ConfigChoice(path, f"{choice.label}, ownInstance", choice.fallback, choice.policies)


SHARED, OWN = "shared per module", "an instance per policy (before)"


@scenario("policies", "memory vs number of policies",
          "kwserver with 4 workers and the ten-policy config, then the 61-policy config (same modules, varied "
          "settings), each with instances shared per module (the default) and with `ownInstance: true` on every "
          "policy (an instance per policy, as before instances were shared), one server at a time. Each gets an "
          "unmeasured warm-up of the realistic mix fanned out over all its policies with 16 connections, in "
          "short rounds until every worker has had connections, so that every worker holds an instance of "
          "every policy; then a measured load point. The per-policy slope is (PSS(61) - PSS(10)) / 51. "
          "Throughput of the ten-policy mix, shared vs an instance per policy: both servers up, load points "
          "interleaved.")
def policies(run: ScenarioRun) -> None:
    o = run.options
    ten, sixty_one = ten_policy_config(run), sixty_one_policy_config(run)
    d = workdir(run, "policies")
    count_workers = 4
    results: dict[str, dict[int, dict[str, float]]] = {SHARED: {}, OWN: {}}
    mixes = {choice.policies: wl.mix_workload(d, f"mix-{choice.policies}", choice.path,
                                              f"realistic mix over all {choice.policies} policies")
             for choice in (ten, sixty_one)}
    configs = {SHARED: (ten, sixty_one), OWN: (own_instance_config(ten, d), own_instance_config(sixty_one, d))}
    for variant, choices in configs.items():
        for choice in choices:
            name = f"kwserver-{choice.policies}p-{'own' if variant == OWN else 'shared'}"
            point = memory_point(run, name, choice, mixes[choice.policies], count_workers,
                                 f"{choice.policies} policies, {variant}", "memory")
            results[variant][choice.policies] = {"pss_mib": point.memory["pss"] / MIB,
                                                 "uss_mib": point.memory["uss"] / MIB}
    n10, n61 = ten.policies, sixty_one.policies
    run.data["memory"] = results
    run.data["fits"] = [{"file": "pss_vs_policies.png", "title": "total PSS vs policies (4 workers, shared)",
                         "x_label": "policies", "y_label": "total PSS (MiB)", "xs": [n10, n61],
                         "ys": [results[SHARED][n10]["pss_mib"], results[SHARED][n61]["pss_mib"]],
                         "slope_unit": "MiB/policy",
                         **linear_fit([n10, n61], [results[SHARED][n10]["pss_mib"],
                                                   results[SHARED][n61]["pss_mib"]]).to_json()}]
    run.tables.append(("Memory per configuration (4 workers, after load)",
                       ["policies", "instances", "total PSS MiB", "total USS MiB"],
                       [[str(n), variant, fmt(r["pss_mib"], 1), fmt(r["uss_mib"], 1)]
                        for variant, by_count in results.items() for n, r in by_count.items()]))
    for variant in (SHARED, OWN):
        a, b = results[variant][n10], results[variant][n61]
        slope_kib = (b["pss_mib"] - a["pss_mib"]) * KIB / (n61 - n10) if n61 != n10 else math.nan
        slope_uss = (b["uss_mib"] - a["uss_mib"]) * KIB / (n61 - n10) if n61 != n10 else math.nan
        run.headline(f"per-policy PSS slope (4 workers, {variant})", f"{slope_kib:.0f} KiB/policy",
                     f"{n10} policies: {a['pss_mib']:.1f} MiB, {n61} policies: {b['pss_mib']:.1f} MiB; "
                     f"USS slope {slope_uss:.0f} KiB/policy", slope_kib=slope_kib, slope_uss_kib=slope_uss,
                     pss_10_mib=a["pss_mib"], pss_61_mib=b["pss_mib"])

    series = "ten-policy mix"
    run.data["baselines"] = {series: OWN}
    shared = run.kwserver("kwserver-10p-shared-rps", ten.path, workers=count_workers)
    own = run.kwserver("kwserver-10p-own-rps", configs[OWN][0].path, workers=count_workers)
    for server in (shared, own):
        run.preflight(server, mixes[n10])
        run.warm_every_worker(server, mixes[n10], connections=16)
    interleaved(run, [(own, mixes[n10], OWN, series), (shared, mixes[n10], SHARED, series)], o.repeats)
    run.stop(shared)
    run.stop(own)
    ratio_headline(run, "req/s of the ten-policy mix, shared per module / an instance per policy", series,
                   SHARED, OWN)


# --- 5a. seed ---------------------------------------------------------------------------------------

# The figures the project started from: Kubewarden 1.7's policy-server with the ten-policy configuration
# (1 and 4 workers), and a user's report of 61 policies. MB as reported (10^6 bytes), drawn in MiB.
SEED_WORKERS_MB = {1: 634, 4: 1108}
SEED_61_POLICIES_GB = (40, 50)


@scenario("seed", "the seed's memory comparisons, on this machine",
          "The comparisons that started the project, measured on kwserver: total PSS of the ten-policy "
          "configuration at 1, 2, 4 and 8 workers, and of the ten- and the 61-policy configurations at 4 "
          "workers, each server alone, after every worker served every policy (warm-up rounds) and one load "
          "point of the realistic mix. Drawn beside the seed's figures for Kubewarden 1.7's policy-server "
          "(634 MB at 1 worker, 1,108 MB at 4) and the user's report (61 policies, 40-50 GB). Those are "
          "quoted, not measured here: the ratios say how far apart the two servers are, not a same-run race.")
def seed(run: ScenarioRun) -> None:
    o = run.options
    ten, sixty_one = ten_policy_config(run), sixty_one_policy_config(run)
    d = workdir(run, "seed")

    def measure(choice: wl.ConfigChoice, count: int) -> float:
        mix = wl.mix_workload(d, f"mix-{choice.policies}", choice.path,
                              f"realistic mix over all {choice.policies} policies")
        point = memory_point(run, f"kwserver-{choice.policies}p-{count}w", choice, mix, count,
                             f"{choice.policies} policies, {count} worker(s)", "seed")
        return point.memory["pss"] / MIB

    by_workers = {count: measure(ten, count) for count in o.worker_counts}
    by_policies = {ten.policies: by_workers[4] if 4 in by_workers else measure(ten, 4),
                   sixty_one.policies: measure(sixty_one, 4)}
    mb = 1e6 / MIB
    seed_workers = {count: value * mb for count, value in SEED_WORKERS_MB.items()}
    low, high = (gb * 1000 * mb for gb in SEED_61_POLICIES_GB)
    run.data["seed"] = {"kwserver_pss_mib_by_workers": by_workers, "kwserver_pss_mib_by_policies": by_policies,
                        "kubewarden_1_7_mb_by_workers": SEED_WORKERS_MB, "report_61_policies_gb": SEED_61_POLICIES_GB}
    run.data["comparisons"] = [{
        "file": "seed.png", "title": "total PSS: kwserver (measured) beside the seed's figures (quoted)",
        "panels": [
            {"title": "ten-policy configuration", "x_label": "workers", "y_label": "total PSS (MiB, log)",
             "measured": {"kwserver": sorted(by_workers.items())},
             "reference": {"Kubewarden 1.7 (seed)": sorted(seed_workers.items())}},
            {"title": "4 workers", "x_label": "policies", "y_label": "total PSS (MiB, log)",
             "measured": {"kwserver": sorted(by_policies.items())},
             "reference": {"user report, 61 policies": [(sixty_one.policies, low, high)]}},
        ]}]
    run.tables.append(("Total PSS, kwserver beside the seed's figures", ["configuration", "kwserver MiB",
                                                                          "seed's figure MiB", "ratio"],
                       [[f"{ten.policies} policies, {count} worker(s)", fmt(value, 1),
                         fmt(seed_workers[count], 0) if count in seed_workers else "-",
                         f"1/{seed_workers[count] / value:.0f}" if count in seed_workers else "-"]
                        for count, value in by_workers.items()]
                       + [[f"{sixty_one.policies} policies, 4 workers", fmt(by_policies[sixty_one.policies], 1),
                           f"{low:,.0f}-{high:,.0f}", f"1/{low / by_policies[sixty_one.policies]:,.0f}"]]))
    for count in sorted(set(by_workers) & set(seed_workers)):
        run.headline(f"total PSS, ten policies, {count} worker(s): kwserver / Kubewarden 1.7",
                     f"1/{seed_workers[count] / by_workers[count]:.0f}",
                     f"{by_workers[count]:.1f} MiB vs {seed_workers[count]:.0f} MiB",
                     kwserver_mib=by_workers[count], seed_mib=seed_workers[count])
    counts = sorted(by_workers)
    growth = (by_workers[counts[-1]] - by_workers[counts[0]]) / (counts[-1] - counts[0]) if len(counts) > 1 \
        else math.nan
    seed_growth = (seed_workers[4] - seed_workers[1]) / 3
    run.headline("cost of one more worker: kwserver / Kubewarden 1.7", f"{growth:.1f} MiB vs {seed_growth:.0f} MiB",
                 f"kwserver {counts[0]}->{counts[-1]} workers, seed 1->4", kwserver_mib=growth,
                 seed_mib=seed_growth)
    sixty = by_policies[sixty_one.policies]
    run.headline(f"{sixty_one.policies} policies at 4 workers", f"{sixty:.1f} MiB",
                 f"the user's report: {SEED_61_POLICIES_GB[0]}-{SEED_61_POLICIES_GB[1]} GB", kwserver_mib=sixty)


# --- 5b. pool --------------------------------------------------------------------------------------

@scenario("pool", "the worker pool through a load burst and the idle time after it",
          "kwserver with the ten-policy config, `--min-workers 1 --max-workers 4` and its default "
          "`--scale-up-after-seconds` and `--scale-down-after-seconds`, starting at one worker. A burst of the "
          "realistic mix (16 connections) grows the pool; then no load at all. Workers and total PSS are "
          "sampled every half second; the figure is how long after the load stopped the pool was back at its "
          "minimum, against the goal of `--scale-down-after-seconds` + 5 s.")
def pool(run: ScenarioRun) -> None:
    o = run.options
    ten = ten_policy_config(run)
    mix = wl.mix_workload(workdir(run, "pool"), "ten-policy-mix", ten.path, "realistic mix over the ten-policy config")
    down = o.pool_scale_down_seconds
    server = run.kwserver("kwserver-pool", ten.path, workers=1, env={
        "KWSERVER_MIN_WORKERS": "1", "KWSERVER_MAX_WORKERS": "4", "KWSERVER_SCALE_DOWN_AFTER_SECONDS": f"{down:g}"})
    run.preflight(server, mix)
    timeline: list[tuple[float, int, float]] = []  # (t, workers, total PSS MiB)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            samples = snapshot(server.name, server.pid)
            timeline.append((run.clock.now(), sum(1 for s in samples if s.role == "worker"),
                             sum(s.pss for s in samples) / MIB))
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, name="pool-watch", daemon=True)
    watcher.start()
    try:
        point = run.load(server, mix, label="burst", series="pool", duration=o.pool_burst_seconds, connections=16)
        load_end = point.t_end
        deadline = time.monotonic() + down + 60
        while time.monotonic() < deadline and not (timeline and timeline[-1][0] > load_end
                                                     and timeline[-1][1] == 1):
            time.sleep(0.5)
        time.sleep(2)  # a little of the idle pool after it settled
    finally:
        stop.set()
        watcher.join(timeout=5)
        run.stop(server)
    peak = max((w for _, w, _ in timeline), default=0)
    back = next((t for t, w, _ in timeline if t > load_end and w == 1), None)
    after = back - load_end if back is not None else math.nan
    peak_pss = max((p for _, _, p in timeline), default=math.nan)
    idle_pss = timeline[-1][2] if timeline else math.nan
    run.data["pool"] = {"timeline": timeline, "load_end": load_end, "back_at_min_after_s": after}
    run.data["lines"] = [{"file": "pool.png", "title": "workers and total PSS through a burst and after it",
                          "x_label": "time since scenario start (s)",
                          "series": {"workers": [(t, w) for t, w, _ in timeline],
                                     "total PSS (MiB)": [(t, p) for t, _, p in timeline]},
                          "marks": [(point.t_start, "load starts"), (load_end, "load stops")]}]
    if peak <= 1:
        value = "the burst did not grow the pool"
    elif back is None:
        value = "not back within the wait"
    else:
        value = f"{after:.1f} s (goal: {down:g} s + 5 s)"
    run.headline("pool back at --min-workers after the load stopped", value,
                 f"peak {peak} workers, total PSS {peak_pss:.1f} MiB at the peak, {idle_pss:.1f} MiB idle",
                 seconds=after, peak_workers=peak, peak_pss_mib=peak_pss, idle_pss_mib=idle_pss)


# --- 6. startup ------------------------------------------------------------------------------------

_BOOT_LINE = re.compile(r"loaded (\d+) policies .*cache (\d+) hit / (\d+) miss\) in ([0-9.]+)s")


@scenario("startup", "time to ready, cold vs warm compile cache",
          "Spawn of `kwserver serve` (2 workers) to the first 200 from the readiness probe, with an empty "
          "compile cache (every module compiled in the master) and with the cache the cold start left "
          "(modules loaded with `Module.deserialize_file`), for the ten- and the 61-policy configs, "
          "interleaved cold/warm. The floor is the same with one small policy, warm (interpreter, imports, "
          "gunicorn; an empty policies.yml is refused). "
          "`boot` is kwserver's own figure from its log (policies loaded, before gunicorn binds). "
          "The `registry` points pull the same modules from a local docker-registry (bench/registry_startup.py): "
          "cold with an empty download dir and compile cache, warm with both kept.")
def startup(run: ScenarioRun) -> None:
    o = run.options
    ten, sixty_one = ten_policy_config(run), sixty_one_policy_config(run)
    empty = config_dir(run) / "policies-floor.yml"
    empty.parent.mkdir(parents=True, exist_ok=True)
    echo = Path(__file__).resolve().parent.parent / "policies" / "dist" / "echo.wasm"
    empty.write_text(yaml.safe_dump({"echo": {"module": str(echo)}}))
    env = {"KUBEWARDEN_LOG_LEVEL": "info"}
    measurements: dict[str, dict[str, list[dict[str, float]]]] = {}

    def start(label: str, config: Path, cache: Path, kind: str, extra_env: dict[str, str] | None = None) -> None:
        server = run.kwserver(f"{label}-{kind}-{len(measurements.get(label, {}).get(kind, []))}", config,
                              cache_dir=cache, env={**env, **(extra_env or {})})
        ready = server.ready_after_s
        snap = snapshot(server.name, server.pid)
        run.stop(server)
        match = _BOOT_LINE.search(server.log())
        measurements.setdefault(label, {}).setdefault(kind, []).append({
            "ready_s": ready,
            "boot_s": float(match.group(4)) if match else math.nan,
            "cache_hits": int(match.group(2)) if match else -1,
            "cache_misses": int(match.group(3)) if match else -1,
            "master_rss_mib": sum(s.rss for s in snap if s.role == "master") / MIB,
            "total_pss_mib": sum(s.pss for s in snap) / MIB,
        })

    from bench.registry_startup import RegistryPoints

    registry = RegistryPoints(run, [ten, sixty_one])
    for r in range(o.startup_repeats):
        start("empty", empty, run.work / "cache-floor", "floor")  # warm after the first repeat
        for choice in (ten, sixty_one):
            cache = run.work / f"cache-{choice.policies}-{r}"
            start(f"{choice.policies} policies", choice.path, cache, "cold")
            start(f"{choice.policies} policies", choice.path, cache, "warm")
        registry.measure(start, r)
    registry.finish(measurements)
    run.data["startup"] = measurements
    bars: dict[str, Any] = {"file": "ready_times.png", "title": "spawn to ready (median, min-max)",
                            "y_label": "seconds", "labels": [], "medians": [], "lows": [], "highs": []}
    for label, kinds in measurements.items():
        for kind, values in kinds.items():
            s = spread([v["ready_s"] for v in values])
            bars["labels"].append(f"{label}, {kind}")
            bars["medians"].append(s.median)
            bars["lows"].append(s.low)
            bars["highs"].append(s.high)
    run.data["bars"] = [bars]
    rows = []
    for label, kinds in measurements.items():
        for kind, values in kinds.items():
            rows.append([label, kind, fmt_spread(spread([v["ready_s"] for v in values]), 2),
                         fmt_spread(spread([v["boot_s"] for v in values]), 2),
                         f"{values[0]['cache_hits']}/{values[0]['cache_misses']}",
                         fmt(statistics.median(v["master_rss_mib"] for v in values), 1),
                         fmt(statistics.median(v["total_pss_mib"] for v in values), 1)])
    run.tables.append(("Time to ready", ["config", "cache", "ready s median (min-max)", "boot s (kwserver log)",
                                         "cache hit/miss", "master RSS MiB", "total PSS MiB (idle)"], rows))
    floor = spread([v["ready_s"] for v in measurements["empty"]["floor"]]).median
    for choice in (ten, sixty_one):
        kinds = measurements[f"{choice.policies} policies"]
        cold = spread([v["ready_s"] for v in kinds["cold"]])
        warm = spread([v["ready_s"] for v in kinds["warm"]])
        pairs = spread([c["ready_s"] / w["ready_s"] for c, w in zip(kinds["cold"], kinds["warm"], strict=True)])
        run.headline(f"startup, {choice.policies} policies: cold vs warm cache",
                     f"cold {cold.median:.2f} s, warm {warm.median:.2f} s ({fmt_ratio(pairs)} faster warm)",
                     f"floor (one small policy) {floor:.2f} s; cold {fmt_spread(cold, 2)} s, "
                     f"warm {fmt_spread(warm, 2)} s",
                     cold_s=cold.median, warm_s=warm.median, floor_s=floor, policies=choice.policies)


# --- 7. soak ---------------------------------------------------------------------------------------

@scenario("soak", "memory over a long run",
          "kwserver (2 workers, ten-policy config, plain HTTP) under the realistic mix for at least "
          "`soak_requests` requests after a warm-up, in back-to-back wrk segments. After each segment the total "
          "PSS (and each worker's USS) is recorded; the slope of a linear fit against the cumulative requests "
          "after warm-up must be ~0; PSS also moves when unrelated processes map or unmap the same shared "
          "libraries, so the total USS (private memory of master and workers) is fitted too. Throughput "
          "drift: median req/s of the last fifth of the segments over the first fifth.")
def soak(run: ScenarioRun) -> None:
    o = run.options
    ten = ten_policy_config(run)
    d = workdir(run, "soak")
    mix = wl.mix_workload(d, "ten-policy-mix", ten.path, "realistic mix over the ten-policy config")
    server = run.kwserver("kwserver-soak", ten.path)
    run.preflight(server, mix)
    warm_requests = 0
    warm_start = run.clock.now()
    while warm_requests < o.soak_warmup_requests and run.clock.now() - warm_start < o.soak_max_seconds / 4:
        point = run.load(server, mix, label="warm-up", series="warm-up", duration=o.soak_segment, record=False)
        warm_requests += point.requests
    run.event("warm-up done")
    measured = 0
    xs: list[float] = []
    pss: list[float] = []
    uss: list[float] = []
    worker_uss: dict[str, list[tuple[float, float]]] = {}
    start = run.clock.now()
    segment = 0
    while measured < o.soak_requests and run.clock.now() - start < o.soak_max_seconds:
        point = run.load(server, mix, label="soak segment", series="soak", repeat=segment, duration=o.soak_segment)
        measured += point.requests
        xs.append(measured)
        pss.append(point.memory["pss"] / KIB)
        uss.append(point.memory["uss"] / KIB)
        for proc in point.memory["processes"]:
            if proc["role"] == "worker":
                worker_uss.setdefault(str(proc["pid"]), []).append((measured, proc["uss"] / KIB))
        segment += 1
    run.stop(server)
    fit = linear_fit(xs, pss)
    fit_uss = linear_fit(xs, uss)
    per_10k = fit.slope * 10_000
    uss_per_10k = fit_uss.slope * 10_000
    worker_slopes = {pid: linear_fit([x for x, _ in v], [y for _, y in v]).slope * 10_000
                     for pid, v in worker_uss.items() if len(v) > 1}
    run.data["soak"] = {"warmup_requests": warm_requests, "measured_requests": measured, "segments": segment,
                        "pss_fit_kib_per_request": fit.to_json(), "uss_fit_kib_per_request": fit_uss.to_json(),
                        "worker_uss_slope_kib_per_10k": worker_slopes}
    run.data["fits"] = [
        {"file": "pss_vs_requests.png", "title": "total PSS vs requests after warm-up",
         "x_label": "requests after warm-up", "y_label": "total PSS (KiB)", "xs": xs, "ys": pss,
         "slope_unit": "KiB/request", **fit.to_json()},
        {"file": "uss_vs_requests.png", "title": "total USS (private memory of master + workers) vs requests",
         "x_label": "requests after warm-up", "y_label": "total USS (KiB)", "xs": xs, "ys": uss,
         "slope_unit": "KiB/request", **fit_uss.to_json()},
    ]
    if measured < o.soak_requests:
        run.notes.append(f"only {measured:,} requests after warm-up within {o.soak_max_seconds:.0f} s "
                         f"(asked for {o.soak_requests:,})")
    rps = [p.rps for p in run.select(series="soak")]
    fifth = max(1, len(rps) // 5)
    drift = statistics.median(rps[-fifth:]) / statistics.median(rps[:fifth]) if rps else math.nan
    run.data["baselines"] = {"soak": "soak segment"}
    run.headline("soak memory slope after warm-up (total PSS; total USS)",
                 f"PSS {per_10k:+.1f} KiB per 10,000 requests; USS {uss_per_10k:+.1f} KiB per 10,000",
                 f"{measured:,} requests after {warm_requests:,} warm-up, {segment} segments; PSS "
                 f"{pss[0] / KIB:.1f} -> {pss[-1] / KIB:.1f} MiB (r²={fit.r2:.2f}), USS {uss[0] / KIB:.1f} -> "
                 f"{uss[-1] / KIB:.1f} MiB; worker USS slopes "
                 + ", ".join(f"{v:+.1f}" for v in worker_slopes.values()) + " KiB/10k",
                 slope_kib_per_10k=per_10k, uss_slope_kib_per_10k=uss_per_10k, requests=measured)
    run.headline("soak throughput drift (last fifth / first fifth of segments)", f"{drift:.2f}x",
                 f"{statistics.median(rps[:fifth]):,.0f} -> {statistics.median(rps[-fifth:]):,.0f} req/s" if rps
                 else "", drift=drift)


# --- 8. mix ----------------------------------------------------------------------------------------

@scenario("mix", "a realistic mix of AdmissionReviews over the ten policies",
          "Pods, Deployments and Services (and raw requests where the config has raw policies), each sent to "
          "every policy whose rules match it, as the API server fans objects out to webhooks: accepted, "
          "rejected and mutated answers (see the preflight counts). The whole mix is measured against the "
          "HTTP ceiling (the canned app with the same mix); then each policy alone with its share of the mix, "
          "over one connection, for its latency.")
def mix(run: ScenarioRun) -> None:
    o = run.options
    ten = ten_policy_config(run)
    d = workdir(run, "mix")
    workload = wl.mix_workload(d, "ten-policy-mix", ten.path, "realistic mix over the ten-policy config")
    canned = run.canned("canned")
    kw = run.kwserver("kwserver", ten.path)
    run.preflight(kw, workload)
    run.warmup(canned, workload)
    run.warmup(kw, workload)
    run.data["baselines"] = {"mix": CANNED, "per policy": None}
    interleaved(run, [(canned, workload, CANNED, "mix"), (kw, workload, "kwserver", "mix")], o.repeats)
    run.stop(canned)
    ratio_headline(run, "mix: kwserver / HTTP ceiling", "mix", "kwserver", CANNED)
    # per policy
    by_policy: dict[str, list[tuple[str, wl.RequestObject]]] = {}
    objects = {obj.name: obj for obj in wl.mix_objects()}
    for url_path, obj_name in workload.entries:
        policy = url_path.rsplit("/", 1)[1]
        by_policy.setdefault(policy, []).append((url_path, objects[obj_name]))
    rows = []
    # One connection: the latency of one evaluation at a time (service time plus the loopback round trip),
    # without queueing behind other connections on the same worker.
    per_policy_duration = max(1.0, o.duration / 2)
    for policy, requests in by_policy.items():
        part = wl.write_workload(d, f"policy-{policy}", f"`{policy}`'s share of the mix", requests)
        part.expected = {k: v for k, v in workload.expected.items() if k.split(" ", 1)[0].endswith(f"/{policy}")}
        point = run.load(kw, part, label=policy, series="per policy", duration=per_policy_duration,
                         connections=1)
        outcomes: dict[str, int] = {}
        for url_path, obj in requests:
            outcome = workload.expected.get(f"{url_path} {obj.name}", "?")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        rows.append([policy, str(len(requests)), ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
                     fmt(point.rps), fmt(point.latency_ms["p50"], 2), fmt(point.latency_ms["p95"], 2),
                     fmt(point.latency_ms["p99"], 2), fmt(point.server_cpu_ms_per_request, 3)])
    run.stop(kw)
    run.tables.append((f"Per-policy latency (one connection, {per_policy_duration:g} s each)",
                       ["policy", "requests in mix", "answers", "req/s", "p50 ms", "p95 ms", "p99 ms",
                        "server CPU ms/req"], rows))
    slowest = max(rows, key=lambda r: float(r[4].replace(",", "")) if r[4] != "n/a" else 0) if rows else None
    if slowest:
        run.headline("mix: slowest policy (p50 alone)", f"{slowest[0]}: p50 {slowest[4]} ms, p99 {slowest[6]} ms",
                     f"{len(rows)} policies measured")
