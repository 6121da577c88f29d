"""The bench harness: wrk output parsing, sampling, ratios and fits, workloads, report writing, the two
baseline apps, and one tiny smoke scenario against real servers (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench import report, sampler, stats, workloads, wrk
from bench.harness import Options, Point, ScenarioRun
from bench.steps import Scenario

REPO = Path(__file__).resolve().parent.parent

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:40001/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.41ms  523.00us   6.45ms   84.19%
    Req/Sec     3.33k    77.40     3.47k    70.00%
  Latency Distribution
     50%    2.42ms
     75%    2.52ms
     90%    2.77ms
     99%    4.01ms
  13236 requests in 4.00s, 4.86MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   3307.34
Transfer/sec:      1.21MB
BENCH_WRK_RESULT {"duration_us":4001234,"requests":13236,"bytes":5096000,\
"errors":{"connect":0,"read":0,"write":0,"status":3,"timeout":0},\
"latency_us":{"min":310,"max":6450,"mean":2410.500,"stdev":523.000,"p50":2420,"p75":2520,"p90":2770,\
"p95":3100,"p99":4010,"p99_9":6000},"entries":1}
"""


# --- wrk ---------------------------------------------------------------------------------------------

def test_parse_wrk_output() -> None:
    result = wrk.parse_output(WRK_OUTPUT)
    assert result.requests == 13236
    assert result.duration_s == pytest.approx(4.001234)
    assert result.rps == pytest.approx(13236 / 4.001234)
    assert result.latency_us["p99"] == 4010
    assert result.non_2xx == 3
    assert result.errors["status"] == 3
    assert result.error_count == 3
    doc = result.to_json()
    assert "text" not in doc and doc["rps"] == pytest.approx(result.rps)


def test_parse_wrk_output_failures() -> None:
    with pytest.raises(wrk.WrkFailed, match="no BENCH_WRK_RESULT"):
        wrk.parse_output("Running 5s test\n  10 requests in 1.00s, 1KB read\n")
    inconsistent = WRK_OUTPUT.replace("13236 requests in", "999 requests in")
    with pytest.raises(wrk.WrkFailed, match="disagree"):
        wrk.parse_output(inconsistent)


@pytest.mark.parametrize(("text", "seconds"), [("2.41ms", 0.00241), ("523.00us", 0.000523), ("1.5s", 1.5),
                                               ("2m", 120.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert wrk.parse_duration(text) == pytest.approx(seconds)


def test_manifest_and_command(tmp_path: Path) -> None:
    body = tmp_path / "a.json"
    body.write_text("{}")
    manifest = wrk.write_manifest(tmp_path / "m", [("/validate/a", body), ("/validate_raw/b", body)])
    lines = manifest.read_text().splitlines()
    assert lines == [f"/validate/a\t{body.resolve()}", f"/validate_raw/b\t{body.resolve()}"]
    with pytest.raises(ValueError):
        wrk.write_manifest(tmp_path / "m", [("validate/a", body)])
    with pytest.raises(ValueError):
        wrk.write_manifest(tmp_path / "m", [])
    argv = wrk.WrkCommand("https://127.0.0.1:3000", manifest, 4.6, 8).argv("/usr/bin/wrk")
    assert argv[:5] == ["/usr/bin/wrk", "-t1", "-c8", "-d5s", "--timeout=10s"]
    assert argv[-1] == "https://127.0.0.1:3000/" and str(wrk.LUA_SCRIPT) in argv
    with pytest.raises(ValueError, match=r"127\.0\.0\.1 only"):
        wrk.WrkCommand("http://example.com:80", manifest, 1, 1).argv("wrk")


def test_missing_wrk_has_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_WRK", str(tmp_path / "no-such-wrk"))
    with pytest.raises(wrk.WrkMissing, match="apt-get install -y wrk"):
        wrk.find_wrk()


def test_cli_fails_clearly_without_wrk(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_WRK": str(tmp_path / "no-such-wrk")}
    out = subprocess.run([sys.executable, "-m", "bench", "ceiling", "--results", str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "apt-get install -y wrk" in out.stderr


# --- stats -------------------------------------------------------------------------------------------

def test_spread_and_ratios() -> None:
    s = stats.spread([3.0, 1.0, 2.0, float("nan")])
    assert (s.median, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.relative == pytest.approx(0.5)
    assert stats.spread([]).n == 0
    assert math.isnan(stats.ratio(1.0, 0.0))
    r = stats.paired_ratios([50, 60, 90], [100, 100, 100])
    assert (r.median, r.low, r.high) == (0.6, 0.5, 0.9)
    assert stats.fmt_ratio(r) == "0.60x (0.50-0.90)"
    assert stats.fmt_spread(stats.spread([1000.0, 2000.0, 3000.0])) == "2,000 (1,000-3,000)"
    assert stats.fmt(float("nan")) == "n/a"


def test_linear_fit() -> None:
    fit = stats.linear_fit([1, 2, 4, 8], [10, 12, 16, 24])
    assert fit.slope == pytest.approx(2.0)
    assert fit.intercept == pytest.approx(8.0)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.at(3) == pytest.approx(14.0)
    noisy = stats.linear_fit([0, 1, 2, 3], [1, 0, 1, 0])
    assert noisy.r2 < 0.5
    assert math.isnan(stats.linear_fit([1], [2]).slope)
    assert math.isnan(stats.linear_fit([1, 1], [2, 3]).slope)


# --- sampling ----------------------------------------------------------------------------------------

def test_sampler_follows_a_process_tree() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        clock = sampler.Clock()
        s = sampler.Sampler(clock, interval=0.05)
        s.add_server("me", os.getpid())
        with s:
            time.sleep(0.3)
        roles = {(x.pid, x.role) for x in s.samples}
        assert (os.getpid(), "master") in roles
        assert (child.pid, "worker") in roles
        assert s.ticks >= 2
        assert all(x.pss > 0 and x.rss >= x.uss for x in s.samples)
        totals = s.totals_over_time("me")
        assert totals and all(v > 0 for _, v in totals)
        assert s.between(0, clock.now(), "me")
        assert sampler.tree_cpu_seconds(os.getpid()) > 0
        snap = sampler.snapshot("me", os.getpid())
        assert sampler.total(snap, "rss") >= sampler.total(snap, "pss") > 0
    finally:
        child.kill()
        child.wait()


def test_sampler_records_the_load_generator() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        s = sampler.Sampler(sampler.Clock(), interval=1)
        s.set_load(child.pid)
        batch = s.tick()
        assert [(x.server, x.role, x.pid) for x in batch] == [("wrk", "load", child.pid)]
        s.set_load(None)
        assert s.tick() == []
    finally:
        child.kill()
        child.wait()


# --- workloads ---------------------------------------------------------------------------------------

def test_rules_and_routing() -> None:
    rule = {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods", "pods/ephemeralcontainers"],
            "operations": ["CREATE", "UPDATE"]}
    assert workloads.rule_matches(rule, "", "v1", "pods", "CREATE")
    assert not workloads.rule_matches(rule, "apps", "v1", "pods", "CREATE")
    assert not workloads.rule_matches(rule, "", "v1", "pods", "DELETE")
    assert workloads.rule_matches({"apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"],
                                   "operations": ["*"]}, "apps", "v1", "deployments", "DELETE")
    pods = workloads.PolicyInfo("pods-only", False, False, (rule,))
    raw = workloads.PolicyInfo("raw", False, True, ())
    objects = workloads.mix_objects()
    routes = workloads.route([pods, raw], objects)
    by_category = {o.name: o.category for o in objects}
    assert all(routes[n] == ["pods-only"] for n, c in by_category.items() if c in ("pod", "service", "deployment"))
    assert all(routes[n] == ["raw"] for n, c in by_category.items() if c == "raw")


def test_mix_is_weighted_and_deterministic() -> None:
    everything = workloads.PolicyInfo("all", False, False, (), wildcard=True)
    objects = workloads.mix_objects()
    mix = workloads.build_mix([everything], objects, length=200)
    assert mix == workloads.build_mix([everything], objects, length=200)
    composition = workloads.mix_composition(mix)
    cats = composition["by_category"]
    assert cats["pod"] > cats["deployment"] > cats["service"] > 0
    assert "raw" not in cats  # no raw policy
    assert cats["pod"] / len(mix) == pytest.approx(0.6, abs=0.05)
    assert {e.path for e in mix} == {"/validate/all"}


def test_fallback_configs_load(tmp_path: Path) -> None:
    from kwserver.config import load_policies

    for count in (10, 61):
        path = workloads.write_fallback_config(tmp_path / f"c{count}.yml", count)
        entries = load_policies(path)
        assert len(entries) == count
        assert path.read_text().startswith("# FALLBACK")
        for entry in entries.values():
            assert (path.parent / entry.module).resolve().is_file()
    choice = workloads.choose_config(None, tmp_path / "missing.yml", 10, tmp_path / "fb")
    assert choice.fallback and choice.policies == 10 and "FALLBACK" in choice.label


def test_workload_files_and_classification(tmp_path: Path) -> None:
    w = workloads.single_request(tmp_path, "one", "p", workloads.POD_PRIVILEGED, "desc")
    line = w.manifest.read_text().strip()
    path, body = line.split("\t")
    assert path == "/validate/p"
    review = json.loads(Path(body).read_text())
    assert review["kind"] == "AdmissionReview" and review["request"]["kind"]["kind"] == "Pod"
    assert workloads.as_review({"uid": "x"})["request"] == {"uid": "x"}
    ok = json.dumps({"response": {"allowed": True}}).encode()
    assert workloads.classify(200, ok) == "accept"
    assert workloads.classify(200, json.dumps({"response": {"allowed": False}}).encode()) == "reject"
    assert workloads.classify(200, json.dumps({"response": {"allowed": True, "patch": "W10="}}).encode()) == "mutate"
    assert workloads.classify(200, json.dumps(
        {"response": {"allowed": False, "status": {"code": 500}}}).encode()) == "error-500"
    assert workloads.classify(404, b"") == "error-http-404"
    assert workloads.classify(200, b"nope") == "error-body"


# --- reports -----------------------------------------------------------------------------------------

def _point(label: str, series: str, repeat: int, rps: float) -> Point:
    mib = 1024 * 1024
    return Point(
        label=label, series=series, server=label, kind="kwserver", transport="http", workload="w", repeat=repeat,
        t_start=repeat * 2.0, t_end=repeat * 2.0 + 1, wrk={"requests": int(rps), "duration_s": 1.0},
        rps=rps, latency_ms={"p50": 1.0, "p75": 1.5, "p90": 2.0, "p95": 2.5, "p99": 3.0, "p99_9": 4.0},
        server_cpu_s=0.9, wrk_cpu_s=0.1, other_cpu_s=0.0, errors=0, non_2xx=0,
        memory={"pss": 50 * mib, "uss": 40 * mib, "rss": 90 * mib,
                "processes": [{"pid": 1, "role": "master", "pss": 20 * mib, "uss": 10 * mib, "rss": 40 * mib}]},
        memory_during={}, connections={"11": 4, "12": 4},
    )


def test_scenario_results_are_written(tmp_path: Path) -> None:
    options = Options(results=tmp_path, interval=0.05)

    def body(run: ScenarioRun) -> None:
        run.sampler.add_server("me", os.getpid())
        time.sleep(0.15)
        for r, (base, cand) in enumerate([(1000, 500), (1000, 600), (800, 400)]):
            run.points.append(_point("canned", "http", r, base))
            run.points.append(_point("kwserver", "http", r, cand))
        run.data["baselines"] = {"http": "canned"}
        run.data["fits"] = [{"file": "fit.png", "title": "t", "x_label": "x", "y_label": "y", "xs": [1, 2],
                             "ys": [3, 5], "slope": 2.0, "intercept": 1.0, "r2": 1.0}]
        r = report.ratio_of(run, "http", "kwserver", "canned")
        assert (r.median, r.low, r.high) == (0.5, 0.5, 0.6)
        c = report.cpu_ratio_of(run, "http", "kwserver", "canned")  # same CPU per point: CPU/req ~ 1/rps
        assert (c.median, c.low, c.high) == pytest.approx((0.5, 0.5, 0.6))
        run.headline("ceiling ratio", stats.fmt_ratio(r), "raw")

    Scenario("ceiling", "title", "description", body).run(options)
    out = tmp_path / "ceiling"
    doc = json.loads((out / "results.json").read_text())
    assert doc["scenario"] == "ceiling" and len(doc["points"]) == 6 and doc["samples"]
    assert doc["points"][1]["server_cpu_ms_per_request"] == pytest.approx(0.9 / 500 * 1000)
    text = (out / "report.md").read_text()
    assert "| kwserver | 500 (400-600) | 0.50x (0.50-0.60) |" in text
    assert "1.00x (baseline)" in text and "ceiling ratio" in text
    pytest.importorskip("matplotlib")
    assert (out / "timeline.png").stat().st_size > 1000
    assert (out / "fit.png").stat().st_size > 1000
    summary = report.write_summary(tmp_path, ["ceiling"], 12.0)
    assert "| [ceiling](ceiling/report.md) | ceiling ratio | 0.50x (0.50-0.60) | raw |" in summary.read_text()


def test_failed_scenario_is_reported(tmp_path: Path) -> None:
    def boom(run: ScenarioRun) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Scenario("soak", "t", "d", boom).run(Options(results=tmp_path))
    doc = json.loads((tmp_path / "soak" / "results.json").read_text())
    assert doc["error"] == "RuntimeError: boom"
    assert "The scenario failed" in (tmp_path / "soak" / "report.md").read_text()


# --- the baseline apps -------------------------------------------------------------------------------

def test_canned_app() -> None:
    from falcon import testing

    from bench import canned

    client = testing.TestClient(canned.create_app())
    result = client.simulate_post("/validate/anything", body=b'{"x": 1}', headers={"Content-Type": "application/json"})
    assert result.status_code == 200
    assert result.json["response"]["allowed"] is True


def test_naive_app_answers_like_kwserver(tmp_path: Path) -> None:
    from falcon import testing

    from bench import naive

    config = tmp_path / "policies.yml"
    config.write_text(yaml.safe_dump({
        "pp": {"module": str(workloads.TEST_POLICIES / "pod-privileged.wasm"), "settings": {}},
        "rm": {"module": str(workloads.TEST_POLICIES / "raw-mutation.wasm"), "allowedToMutate": True,
               "settings": {"forbiddenResources": ["banana"], "defaultResource": "hay"}},
    }))
    client = testing.TestClient(naive.create_app(str(config)))
    headers = {"Content-Type": "application/json"}
    rejected = client.simulate_post("/validate/pp", body=workloads.POD_PRIVILEGED.read_bytes(), headers=headers)
    assert rejected.json["response"]["allowed"] is False
    assert rejected.json["response"]["status"]["message"] == "Privileged container is not allowed"
    accepted = client.simulate_post("/validate/pp", body=workloads.POD_UNPRIVILEGED.read_bytes(), headers=headers)
    assert accepted.json["response"]["allowed"] is True
    mutated = client.simulate_post("/validate_raw/rm", headers=headers,
                                   body=b'{"request": {"user": "a", "action": "eats", "resource": "banana"}}')
    assert mutated.json["response"]["patchType"] == "JSONPatch"
    assert client.simulate_post("/validate/nope", body=b"{}", headers=headers).status_code == 404


# --- smoke: one tiny scenario against real servers ---------------------------------------------------

@pytest.mark.integration
def test_smoke_ceiling(tmp_path: Path) -> None:
    try:
        wrk.find_wrk()
    except wrk.WrkMissing as exc:
        pytest.skip(str(exc))
    out = subprocess.run(
        [sys.executable, "-m", "bench", "ceiling", "--quick", "--duration", "1", "--warmup", "0.2",
         "--transports", "http", "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-4000:]
    doc = json.loads((tmp_path / "ceiling" / "results.json").read_text())
    assert doc["error"] is None
    labels = {p["label"] for p in doc["points"]}
    assert labels >= {"canned (ceiling)", "canned on gthread (before)", "kwserver accept", "kwserver reject"}
    assert all(p["requests"] > 0 and p["errors"] == 0 and p["non_2xx"] == 0 for p in doc["points"])
    assert all(p["wrk_cpu_s"] > 0 and p["server_cpu_s"] > 0 for p in doc["points"])
    role = doc["sample_fields"].index("role")
    assert {row[role] for row in doc["samples"]} >= {"master", "worker", "load"}
    # kwserver / canned on its own stack and on gthread, accepted and rejected (and uvicorn when installed);
    # kwserver / its older commit when the history has it (a shallow clone does not).
    before = "kwserver accept at 4ecc251" in labels
    assert len(doc["headlines"]) == 4 + ("canned on uvicorn-worker" in labels) + before
    assert before or any("not in this checkout's history" in note for note in doc["notes"])
    assert (tmp_path / "ceiling" / "report.md").exists()
    assert (tmp_path / "SUMMARY.md").exists()


def test_every_mix_object_is_a_valid_request() -> None:
    from kwserver import admission

    for obj in workloads.mix_objects():
        doc = json.loads(obj.body())
        parsed = admission.parse_raw_review(doc) if obj.raw else admission.parse_admission_review(doc)
        assert parsed is not None, obj.name
