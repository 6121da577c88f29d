"""What scenarios are made of: `Scenario` (a body that fills a ScenarioRun) and the steps they share:
the configurations and workloads, answer checks, interleaved load points, headline ratios."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import workloads as wl
from bench.harness import Options, ScenarioRun
from bench.report import cpu_ratio_of, median_rps, ratio_of, write_scenario
from bench.stats import fmt, fmt_ratio, spread


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    description: str
    body: Callable[[ScenarioRun], None]

    def run(self, options: Options) -> None:
        """Run the body and write bench/results/<name>/, also when it fails (the failure is reported)."""
        run = ScenarioRun(self.name, options, self.title, self.description)
        try:
            with run:
                self.body(run)
        finally:
            write_scenario(run)


def scenario(name: str, title: str, description: str) -> Callable[[Callable[[ScenarioRun], None]], Scenario]:
    """The decorated body as a Scenario (listed in bench/cli.py)."""
    return lambda body: Scenario(name, title, description, body)


# --- shared pieces ---------------------------------------------------------------------------------

def config_dir(run: ScenarioRun) -> Path:
    return run.options.results / "configs"


def ten_policy_config(run: ScenarioRun) -> wl.ConfigChoice:
    return _policy_config(run, "ten", run.options.ten_policy_config, wl.DEFAULT_CONFIG_10, 10)


def sixty_one_policy_config(run: ScenarioRun) -> wl.ConfigChoice:
    return _policy_config(run, "sixty-one", run.options.sixty_one_policy_config, wl.DEFAULT_CONFIG_61, 61)


def _policy_config(run: ScenarioRun, key: str, given: str | None, default: Path, count: int) -> wl.ConfigChoice:
    choice = wl.choose_config(given, default, count, config_dir(run))
    run.configs[key] = choice.to_json()
    if choice.fallback:
        run.notes.append(f"Measured on the {choice.label}: the policy library's config did not exist yet.")
    return choice


def single_config(run: ScenarioRun) -> Path:
    path = wl.single_policy_config(config_dir(run) / "policies-pod-privileged.yml")
    run.configs["one"] = {"path": str(path), "label": "pod-privileged alone (tests/policies/pod-privileged.wasm)",
                          "fallback": False, "policies": 1}
    return path


def pod_privileged_policy(config: Path) -> str:
    """The policy of a config that runs pod-privileged (the one-policy workload), else the first Kubernetes one."""
    infos = wl.describe_config(config)
    entries = wl.load_policies(config)
    for info in infos:
        entry = entries[info.name]
        module = getattr(entry, "module", "")
        if not info.group and "pod-privileged" in module:
            return info.name
    for info in infos:
        if not info.group and not info.raw:
            return info.name
    raise ValueError(f"{config} has no Kubernetes policy")


def pod_workloads(directory: Path, policy: str = "pod-privileged") -> tuple[wl.Workload, wl.Workload]:
    """The reference server's ~5 KB pods sent to `policy`: one accepted, one rejected."""
    return (wl.single_request(directory, "pod-accept-5k", policy, wl.POD_UNPRIVILEGED, "5.4 KB Pod, accepted"),
            wl.single_request(directory, "pod-reject-5k", policy, wl.POD_PRIVILEGED, "5.3 KB Pod, rejected"))


def plain_policies(config: Path) -> set[str]:
    return {i.name for i in wl.describe_config(config) if not i.group}


def workdir(run: ScenarioRun, name: str) -> Path:
    path = run.work / "workloads" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_outcomes(run: ScenarioRun, server: Any, workload: wl.Workload, expect: str | None = None) -> None:
    outcomes = run.preflight(server, workload)
    if expect is not None and set(outcomes) != {expect}:
        raise RuntimeError(f"{server.name} answered {dict(outcomes)} to `{workload.name}`, expected only {expect}")


def ratio_headline(run: ScenarioRun, figure: str, series: str, label: str, baseline: str, **numbers: Any) -> None:
    r = ratio_of(run, series, label, baseline)
    c = cpu_ratio_of(run, series, label, baseline)
    a, b = median_rps(run, series, label), median_rps(run, series, baseline)
    cpu_a = spread([p.server_cpu_ms_per_request for p in run.select(series=series, label=label)]).median
    cpu_b = spread([p.server_cpu_ms_per_request for p in run.select(series=series, label=baseline)]).median
    run.headline(figure, f"{fmt_ratio(r)}; CPU-cost ratio {fmt_ratio(c)}",
                 f"{fmt(a.median)} vs {fmt(b.median)} req/s; {fmt(cpu_a, 3)} vs {fmt(cpu_b, 3)} server CPU ms/req",
                 ratio=r.median, ratio_low=r.low, ratio_high=r.high, cpu_ratio=c.median, rps=a.median,
                 baseline_rps=b.median, **numbers)


def interleaved(run: ScenarioRun, plan: list[tuple[Any, wl.Workload, str, str]], repeats: int,
                duration: float | None = None) -> None:
    """Run (server, workload, label, series) points `repeats` times, interleaved repeat by repeat."""
    for repeat in range(repeats):
        for server, workload, label, series in plan:
            run.load(server, workload, label=label, series=series, repeat=repeat, duration=duration)


