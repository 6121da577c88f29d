"""The compiled-module cache: warm restarts skip compilation; native code is only loaded from private places."""

import os
from pathlib import Path

import pytest
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


OTHER_UID = 65534  # nobody


def _artifact_of_another_module(directory, options=OPTIONS) -> None:
    """Native code planted where the cache would look for pod-privileged: another module's."""
    other = Path(policy_path("sleeping")).read_bytes()
    name = f"digest-{options.fingerprint()}.cwasm"
    (directory / name).write_bytes(wasmtime.Module(make_engine(options), other).serialize())


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o720])
def test_a_directory_others_can_write_is_never_used_itself(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    _artifact_of_another_module(shared)
    shared.chmod(mode)
    cache = _load(shared)
    assert cache.directory == shared / f"kwserver-{os.getuid()}"
    assert cache.hits == 0 and cache.misses == 1  # the planted artifact was not loaded


def test_a_private_subdirectory_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    planted = shared / f"kwserver-{os.getuid()}"
    planted.mkdir()
    _artifact_of_another_module(planted)
    planted.chmod(0o777)  # made by someone else, or loosened: anyone can put native code there
    cache = _load(shared)
    assert cache.directory is None and cache.hits == 0
    assert cache.path_for("digest") is None


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_directories_owned_by_another_user_are_not_used(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    _artifact_of_another_module(foreign)
    os.chown(foreign, OTHER_UID, OTHER_UID)
    cache = _load(foreign)
    assert cache.directory != foreign and cache.hits == 0
    # A private subdirectory squatted by another user in a shared directory is refused too.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    squatted = shared / f"kwserver-{os.getuid()}"
    squatted.mkdir(mode=0o700)
    _artifact_of_another_module(squatted)
    os.chown(squatted, OTHER_UID, OTHER_UID)
    cache = _load(shared)
    assert cache.directory is None and cache.hits == 0


def test_an_unusable_directory_compiles_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = _load(blocker / "cache")
    assert cache.directory is None and cache.misses == 1
