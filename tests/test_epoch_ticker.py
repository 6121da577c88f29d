"""The epoch ticker: deadlines fire while it runs, and stopping it leaves no thread behind (the master
forks right after its boot checks, and threads do not survive fork)."""

import threading

import pytest
import wasmtime

from kwserver.runtime import GuestTimeout, InstanceLimits
from kwserver.runtime.engine import EngineOptions, EpochTicker, make_engine
from kwserver.runtime.wapc import WapcModule

ENDLESS = """(module (memory (export "memory") 1) (func (export "wapc_init"))
    (func (export "__guest_call") (param i32 i32) (result i32) (loop $l (br $l)) (i32.const 0)))"""


def _ticker_threads():
    return [t for t in threading.enumerate() if t.name == "kwserver-epoch"]


def test_deadlines_fire_while_the_ticker_runs_and_stop_ends_its_thread():
    others = len(_ticker_threads())  # tickers of other tests' fixtures
    engine = make_engine(EngineOptions(epoch_interruption=True))
    ticker = EpochTicker(engine)
    ticker.start()
    ticker.start()  # idempotent: still one thread
    assert len(_ticker_threads()) == others + 1
    module = WapcModule(engine, wasmtime.Module(engine, wasmtime.wat2wasm(ENDLESS)), epoch_interruption=True)
    instance = module.instantiate(InstanceLimits(memory_bytes=1 << 20, timeout_seconds=1))
    with pytest.raises(GuestTimeout):
        instance.call("validate", b"{}")
    ticker.stop()
    assert len(_ticker_threads()) == others
    ticker.stop()  # stopping twice is fine
    ticker.start()  # and it can start again (the master after a reload)
    assert len(_ticker_threads()) == others + 1
    ticker.stop()
    assert len(_ticker_threads()) == others
