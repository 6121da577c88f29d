"""The wasmtime engine, the compiled-module cache and the epoch ticker.

Compilation happens in the gunicorn master only, before it forks: wasmtime's compiler thread pool
does not survive fork (a compile in a child deadlocks). Compiled code is written to a cache file (its
digest beside it, runtime/artifacts.py) and loaded back with `Module.deserialize_file` from a sealed
in-memory copy of the checked bytes, so its pages are shared by every worker forked after, and a restart
with a warm cache skips compilation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import platform
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import wasmtime

from kwserver.metadata import PolicyMetadata
from kwserver.runtime import artifacts, pooling

log = logging.getLogger(__name__)

WASMTIME_VERSION = version("wasmtime")

# The epoch advances this often; deadlines are counted in ticks. Ten ticks a second makes a timeout
# fire within 100 ms of its due time (the reference ticks once a second).
TICKS_PER_SECOND = 10
TICK_SECONDS = 1.0 / TICKS_PER_SECOND
# Deadline for stores that must never be interrupted while epoch interruption is on (about 3 years).
NO_DEADLINE_TICKS = 1 << 30


@dataclass(frozen=True)
class EngineOptions:
    epoch_interruption: bool
    # None: wasmtime's on-demand allocator (every instance maps its own memory)
    pool: pooling.PoolSize | None = None

    def fingerprint(self) -> str:
        """Everything a compiled artifact depends on besides the wasm bytes (the allocator is not:
        the same compiled code runs in pooled and on-demand instances)."""
        text = "|".join((
            WASMTIME_VERSION,
            platform.machine(),
            f"epoch={int(self.epoch_interruption)}",
        ))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_engine(options: EngineOptions) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = options.epoch_interruption
    # Parallel compilation is fine in the master; workers never compile (see module docstring).
    config.parallel_compilation = True
    config.cranelift_opt_level = "speed"
    # A module's initial memory is mapped from an image instead of copied (the default, stated).
    config.memory_init_cow = True
    if options.pool is not None:
        pooling.configure(config, options.pool)  # else (or when it cannot) the on-demand allocator
    return wasmtime.Engine(config)


@dataclass(frozen=True)
class CompiledModule:
    """One unique policy module, compiled once and shared by every policy that uses it."""

    digest: str  # sha256 of the wasm bytes
    module: wasmtime.Module
    metadata: PolicyMetadata
    size: int  # bytes of the wasm module
    compiled_size: int  # bytes of native code artifact (shared copy-on-write by the workers)
    source: str  # where it was loaded from (for logs)

    @property
    def execution_mode(self) -> str:
        return self.metadata.execution_mode


def malloc_trim() -> None:
    """Give the compiler's freed heap back to the OS before forking, so workers don't inherit it."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name).malloc_trim(0)


class CompileCache:
    """Compiled artifacts on disk, keyed by module digest and engine fingerprint.

    A `.cwasm` file is native code that wasmtime loads without further checks, so the cache is only
    used from a directory that belongs to this user and that nobody else can write to, and each file is
    checked against the digest stored beside it before it is loaded (damage, not malice).
    """

    def __init__(self, directory: Path | Sequence[Path] | None, options: EngineOptions):
        """`directory` may be a list of candidates: the first usable one is taken (a read-only home
        directory falls back to the temporary directory); with none usable, modules compile in memory.
        A candidate before it that cannot be written but that only we or root can change (a cache
        warmed into an image whose root filesystem is read-only) is still read from."""
        self.options = options
        candidates = [directory] if isinstance(directory, Path) else list(directory or ())
        self.directory = None
        self.read_only: list[Path] = []
        problems = []
        for candidate in candidates:
            self.directory, problem = self._usable(candidate)
            if self.directory is not None:
                break
            if self._trusted(candidate):
                self.read_only.append(candidate)
                continue
            problems.append(f"{candidate} {problem}")
        if problems and self.directory is None:
            log.warning("compiled-module cache: %s; compiling in memory", "; ".join(problems))
        elif problems:
            log.info("compiled-module cache: %s; using %s", "; ".join(problems), self.directory)
        if self.read_only:
            log.info("compiled-module cache: reading %s too", ", ".join(map(str, self.read_only)))
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _private(directory: Path) -> bool:
        info = directory.stat()
        return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)

    @staticmethod
    def _trusted(path: Path) -> bool:
        """Native code only we or root can have put there: owned by one of us, writable by nobody else."""
        try:
            info = path.stat()
        except OSError:
            return False
        return info.st_uid in (os.getuid(), 0) and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)

    @classmethod
    def _usable(cls, directory: Path) -> tuple[Path | None, str]:
        """The directory itself if only we can write to it, else a private subdirectory of it.

        A shared directory (a Kubernetes emptyDir is world-writable) gets a `kwserver-<uid>` subdirectory
        with mode 0700, which nobody else can fill with native code.
        """
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            chosen = directory
            if not cls._private(directory):
                chosen = directory / f"kwserver-{os.getuid()}"
                chosen.mkdir(mode=0o700, exist_ok=True)
                if not cls._private(chosen):
                    return None, "is writable by others or not ours"
            if not os.access(chosen, os.W_OK | os.X_OK):
                return None, "is not writable"
            return chosen, ""
        except OSError as exc:
            return None, f"is not usable ({exc})"

    def path_for(self, digest: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{digest}-{self.options.fingerprint()}.cwasm"

    def load(self, engine: wasmtime.Engine, wasm: bytes, digest: str) -> tuple[wasmtime.Module, int]:
        """Return the compiled module and the size of its native artifact.

        Every artifact is checked against the digest stored beside it before wasmtime sees it
        (runtime/artifacts.py); a damaged one is compiled again and replaced, with a warning.
        """
        cached = self._cached(engine, digest)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        return self._compile(engine, wasm, digest)

    def load_derived(self, engine: wasmtime.Engine, name: str,
                     build: Callable[[], bytes | None]) -> tuple[wasmtime.Module, int] | None:
        """A module made from another one (a pre-initialised snapshot) and cached under `name`: `build`
        runs only when it is not cached; None when `build` gives nothing. Not counted in hits and misses,
        which count the policies' own modules."""
        cached = self._cached(engine, name)
        if cached is not None:
            return cached
        wasm = build()
        return None if wasm is None else self._compile(engine, wasm, name)

    def _cached(self, engine: wasmtime.Engine, digest: str) -> tuple[wasmtime.Module, int] | None:
        for warmed in self.read_only:
            artifact = warmed / f"{digest}-{self.options.fingerprint()}.cwasm"
            if self._trusted(artifact):
                loaded = self._deserialize(engine, artifact, "not using")
                if loaded is not None:
                    return loaded
        path = self.path_for(digest)
        return None if path is None else self._deserialize(engine, path, "compiling again, replacing")

    def _compile(self, engine: wasmtime.Engine, wasm: bytes, digest: str) -> tuple[wasmtime.Module, int]:
        path = self.path_for(digest)
        module = wasmtime.Module(engine, wasm)
        artifact = module.serialize()
        if path is None:
            return module, len(artifact)
        try:
            artifacts.store(path, artifact)
        except OSError as exc:
            log.warning("could not write compiled module %s: %s", path, exc)
            return module, len(artifact)
        # Loaded back from the cache (as every later start will), so the code pages are shared with the workers.
        return self._deserialize(engine, path, "using the compiled module in memory") or (module, len(artifact))

    @staticmethod
    def _deserialize(engine: wasmtime.Engine, path: Path, otherwise: str) -> tuple[wasmtime.Module, int] | None:
        try:
            with artifacts.verified(path) as checked:
                return wasmtime.Module.deserialize_file(engine, checked), path.stat().st_size
        except FileNotFoundError:
            return None
        except artifacts.DamagedArtifact as exc:
            log.warning("damaged compiled module in the cache, %s: %s", otherwise, exc)
        except (OSError, wasmtime.WasmtimeError) as exc:  # built for another CPU, for instance
            log.warning("unusable compiled module %s, %s: %s", path, otherwise, exc)
        return None


class EpochTicker:
    """Advances the engine epoch so that deadlines fire. One per process: threads don't survive fork."""

    def __init__(self, engine: wasmtime.Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kwserver-epoch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self.engine.increment_epoch()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None


def deadline_ticks(timeout_seconds: int | None) -> int:
    return NO_DEADLINE_TICKS if timeout_seconds is None else max(1, timeout_seconds * TICKS_PER_SECOND)
