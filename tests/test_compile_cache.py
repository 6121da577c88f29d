"""The compiled-module cache: warm restarts skip compilation; native code is only loaded from private places."""

import os
import subprocess
from pathlib import Path

import pytest
import wasmtime

from kwserver.runtime.engine import CompileCache, EngineOptions, make_engine
from tests.support.paths import policy_path

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


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "one flipped bit":
        data[len(data) // 2] ^= 0x01
    elif how == "random bytes inside":
        data[len(data) // 3:len(data) // 3 + 4096] = os.urandom(4096)
    elif how == "truncated":
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["one flipped bit", "random bytes inside", "truncated", "no digest"])
def test_a_damaged_artifact_is_never_loaded_and_is_replaced(tmp_path, caplog, how):
    cache = _load(tmp_path)
    artifact = cache.path_for("digest")
    good = artifact.read_bytes()
    if how == "no digest":  # a cache written before digests were kept
        artifact.with_name(artifact.name + ".sha256").unlink()
    else:
        _damage(artifact, how)
    again = _load(tmp_path)
    assert (again.hits, again.misses) == (0, 1)
    assert "damaged compiled module in the cache, compiling again, replacing" in caplog.text
    assert artifact.read_bytes() == good and _load(tmp_path).hits == 1


def test_every_artifact_has_its_digest_beside_it(tmp_path):
    import hashlib

    artifact = _load(tmp_path).path_for("digest")
    stored = artifact.with_name(artifact.name + ".sha256").read_text().strip()
    assert stored == hashlib.sha256(artifact.read_bytes()).hexdigest()


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


def _load_read_only(warm: Path, spare: Path, wasm: bytes = WASM, digest: str = "digest") -> dict:
    """Load with `warm` read-only, as a cache baked into an image with a read-only root filesystem:
    chmod for a user, a read-only bind mount in a mount namespace of its own for root."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\nfrom pathlib import Path\n"
        "from kwserver.runtime.engine import CompileCache, EngineOptions, make_engine\n"
        "options = EngineOptions(epoch_interruption=True)\n"
        f"cache = CompileCache([Path({str(warm)!r}), Path({str(spare)!r})], options)\n"
        f"cache.load(make_engine(options), sys.stdin.buffer.read(), {digest!r})\n"
        "print(json.dumps({'hits': cache.hits, 'misses': cache.misses, 'directory': str(cache.directory),"
        " 'read_only': [str(p) for p in cache.read_only]}))\n")
    command = [sys.executable, "-c", script]
    if os.getuid() == 0:
        command = ["unshare", "-m", "sh", "-c", f"mount --bind {warm} {warm} && mount -o remount,bind,ro {warm} "
                   '&& exec "$@"', "sh", *command]
    else:
        warm.chmod(warm.stat().st_mode & ~0o222)
    result = subprocess.run(command, input=wasm, capture_output=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


needs_read_only = pytest.mark.skipif(
    os.getuid() == 0 and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
    reason="as root, a directory is only read-only as a read-only bind mount, which needs unshare -m")


@needs_read_only
def test_a_read_only_cache_is_read_and_what_it_lacks_is_written_to_the_next(tmp_path):
    warm = tmp_path / "warm"
    _load(warm)  # the build-time warm-up
    loaded = _load_read_only(warm, tmp_path / "spare")
    assert loaded == {"hits": 1, "misses": 0, "directory": str(tmp_path / "spare"), "read_only": [str(warm)]}
    other = _load_read_only(warm, tmp_path / "spare", Path(policy_path("sleeping")).read_bytes(), "other")
    assert other["misses"] == 1 and list((tmp_path / "spare").glob("*.cwasm"))


@needs_read_only
def test_a_read_only_cache_others_could_write_is_not_read(tmp_path):
    warm = tmp_path / "warm"
    warm.mkdir()
    _artifact_of_another_module(warm)
    warm.chmod(0o775)
    loaded = _load_read_only(warm, tmp_path / "spare")
    assert loaded["read_only"] == [] and loaded["hits"] == 0


@pytest.mark.integration
def test_a_damaged_cache_neither_crashes_the_server_nor_check(tmp_path):
    from tests.support.paths import SERVER_FIXTURES, load_json
    from tests.support.server import start_server, stop_server

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    policies = {"pod-privileged": {"module": policy_path("pod-privileged")}}
    privileged = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
    (tmp_path / "first").mkdir()
    stop_server(start_server(tmp_path / "first", policies, cache))  # the cache is warm
    # The module as compiled, and the pre-initialised one the instances come from: either may be damaged.
    for artifact in cache.glob("*.cwasm"):
        _damaged_artifact_is_replaced(tmp_path, cache, policies, privileged, artifact)


def _damaged_artifact_is_replaced(tmp_path, cache, policies, privileged, artifact):
    from tests.support.server import check_config, start_server, stop_server

    for round_, how in enumerate(("random bytes inside", "one flipped bit")):
        _damage(artifact, how)
        directory = tmp_path / f"again-{artifact.name}-{round_}"
        directory.mkdir()
        server = start_server(directory, policies, cache)
        try:
            reply = server.post("/validate/pod-privileged", privileged)
            assert reply.status_code == 200 and reply.json()["response"]["allowed"] is False
            assert "damaged compiled module in the cache, compiling again, replacing" in server.log()
        finally:
            stop_server(server)
    _damage(artifact, "random bytes inside")
    checked = check_config(tmp_path, policy_path("pod-privileged"))  # reads the same cache
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.integration
def test_a_cache_file_damaged_in_place_cannot_reach_a_running_server(tmp_path):
    # Found by `python -m bench chaos`: code mapped from the cache file changed under every process when the
    # file was rewritten in place, and the whole server died. What is loaded is now a sealed copy.
    import signal

    import psutil

    from tests.support.paths import SERVER_FIXTURES, load_json
    from tests.support.server import start_server, stop_server, wait_for

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    privileged = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
    server = start_server(tmp_path, {"pod-privileged": {"module": policy_path("pod-privileged")}}, cache,
                          env={"KUBEWARDEN_WORKERS": "1"})
    try:
        # Every artifact the instances come from: the module as compiled and the pre-initialised one.
        for artifact in cache.glob("*.cwasm"):
            _damage_in_place(artifact)
        psutil.Process(server.process.pid).send_signal(signal.SIGTTIN)  # a worker forked after the damage
        wait_for(lambda: len(psutil.Process(server.process.pid).children()) == 2)
        for _ in range(20):
            reply = server.post("/validate/pod-privileged", privileged)
            assert reply.status_code == 200 and reply.json()["response"]["allowed"] is False
            server.session.close()
        assert server.process.poll() is None
    finally:
        stop_server(server)


def _damage_in_place(artifact):
    with open(artifact, "r+b") as stream:  # the same inode, as a disk or a careless `dd` would
        stream.seek(0)
        stream.write(os.urandom(artifact.stat().st_size))
