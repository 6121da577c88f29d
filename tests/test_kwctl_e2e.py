"""The policy library against the e2e suites of its upstream counterparts: bats runs each suite with a
`kwctl` on PATH that is kwserver's shim (deploy/kwctl), in a directory laid out as upstream's (the module
as annotated-policy.wasm and policy.wasm, the upstream test_data next to it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import FIXTURES, REPO

SUITES = REPO / "tests" / "e2e"
DIST = REPO / "policies" / "dist"
# upstream policy directory (and suite name) -> module of the library
LIBRARY = {
    "allow-privilege-escalation-psp-policy": "allow-privilege-escalation-psp",
    "apparmor-psp-policy": "apparmor-psp",
    "capabilities-psp-policy": "capabilities-psp",
    "deprecated-api-versions-policy": "deprecated-api-versions",
    "echo": "echo",
    "host-namespaces-psp-policy": "host-namespaces-psp",
    "hostpaths-psp-policy": "hostpaths-psp",
    "pod-privileged-policy": "pod-privileged",
    "safe-labels-policy": "safe-labels",
    "unique-ingress-policy": "unique-ingress",
    "user-group-psp-policy": "user-group-psp",
}
BATS = shutil.which("bats")


@pytest.fixture(scope="module")
def kwctl_env(tmp_path_factory: pytest.TempPathFactory, compile_cache: Path) -> dict[str, str]:
    """An environment whose PATH starts with a directory holding only `kwctl`, the shim onto kwserver."""
    shim_dir = tmp_path_factory.mktemp("shim")
    shutil.copy(REPO / "deploy" / "kwctl", shim_dir / "kwctl")
    kwserver = Path(sys.executable).parent / "kwserver"
    assert kwserver.exists(), "kwserver must be installed in the test interpreter's environment"
    return {**os.environ, "PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}", "KWSERVER": str(kwserver),
            "KWSERVER_COMPILE_CACHE_DIR": str(compile_cache)}


def test_every_library_policy_has_a_suite():
    assert {path.stem for path in SUITES.glob("*.bats")} == set(LIBRARY)
    assert {path.stem for path in DIST.glob("*.wasm")} == set(LIBRARY.values())


@pytest.mark.skipif(BATS is None, reason="bats is not installed (Debian package bats)")
@pytest.mark.parametrize("suite", sorted(LIBRARY))
def test_upstream_e2e_suite(suite: str, kwctl_env: dict[str, str], tmp_path: Path):
    module = DIST / f"{LIBRARY[suite]}.wasm"
    for name in ("annotated-policy.wasm", "policy.wasm"):
        (tmp_path / name).symlink_to(module)
    (tmp_path / "test_data").symlink_to(FIXTURES / "kubewarden-policies" / suite / "test_data")
    result = subprocess.run([BATS, "--tap", str(SUITES / f"{suite}.bats")], cwd=tmp_path, env=kwctl_env,
                            capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    planned = re.search(r"^1\.\.(\d+)$", result.stdout, re.MULTILINE)
    assert planned and int(planned.group(1)) > 0, report
    assert result.returncode == 0, report
    assert len(re.findall(r"^ok ", result.stdout, re.MULTILINE)) == int(planned.group(1)), report


def test_shim_moves_kwctl_global_flags_after_the_subcommand(kwctl_env: dict[str, str], tmp_path: Path):
    request = FIXTURES / "kubewarden-policies" / "pod-privileged-policy" / "test_data" / "privileged_container.json"
    result = subprocess.run(["kwctl", "-v", "run", "-r", str(request), str(DIST / "pod-privileged.wasm")],
                            env=kwctl_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"allowed":false' in result.stdout
    assert " DEBUG " in result.stderr  # -v reached `run`
