"""The compiled-module cache: warm restarts skip compilation; native code is only loaded from private places."""

import os
from pathlib import Path

import wasmtime

from kwserver.runtime.engine import CompileCache, EngineOptions, make_engine
from tests.conftest import policy_path

WASM = Path(policy_path("pod-privileged")).read_bytes()
OPTIONS = EngineOptions(epoch_interruption=True)


def _load(directory):
    cache = CompileCache(directory, OPTIONS)
    module, size = cache.load(make_engine(OPTIONS), WASM, "digest")
    assert isinstance(module, wasmtime.Module) and size > 0
    return cache


def test_second_load_is_a_hit(tmp_path):
    assert _load(tmp_path / "cache").misses == 1
    assert _load(tmp_path / "cache").hits == 1


def test_engine_settings_are_part_of_the_key(tmp_path):
    first = CompileCache(tmp_path, OPTIONS).path_for("d")
    assert first != CompileCache(tmp_path, EngineOptions(epoch_interruption=False)).path_for("d")


def test_a_shared_directory_gets_a_private_subdirectory(tmp_path):
    shared = tmp_path / "emptydir"
    shared.mkdir()
    shared.chmod(0o777)
    cache = _load(shared)
    assert cache.directory == shared / f"kwserver-{os.getuid()}"
    assert cache.directory.stat().st_mode & 0o777 == 0o700
    assert _load(shared).hits == 1


def test_a_corrupt_artifact_is_recompiled(tmp_path):
    cache = _load(tmp_path)
    cache.path_for("digest").write_bytes(b"not native code")
    assert _load(tmp_path).misses == 1
