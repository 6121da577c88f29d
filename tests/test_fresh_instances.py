"""Fresh instances per evaluation (kwserver/evaluation/pool.py, kwserver/runtime/pristine.py): nothing an
evaluation leaves in memory or globals is seen by the next one, whichever way the instance was made."""

import contextlib
import itertools

import pytest
import wasmtime

from kwserver.admission import parse_admission_review
from kwserver.runtime import pristine
from tests.support.paths import CONFORMANCE, as_review, load_json

# Answers the evaluations it has seen, counted in memory and in a global: "11" for a fresh instance.
# With `grow`, every call also grows the memory by a page (a restore cannot shrink it back).
STATEFUL = """(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (data (i32.const 100) "{{\\"valid\\":true,\\"accepted\\":false,\\"message\\":\\"00\\"}}")
  (func (export "wapc_init") (i32.store8 (i32.const 4000) (i32.const 48)))
  (func (export "__guest_call") (param i32 i32) (result i32)
    (i32.store8 (i32.const 4000) (i32.add (i32.load8_u (i32.const 4000)) (i32.const 1)))
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store8 (i32.const 142) (i32.load8_u (i32.const 4000)))
    (i32.store8 (i32.const 143) (i32.add (global.get $calls) (i32.const 48)))
    {grow}
    (call $respond (i32.const 100) (i32.const 46))
    (i32.const 1)))
"""
REQUEST = parse_admission_review(as_review(load_json(CONFORMANCE / "fixtures/kwctl/privileged-pod.json")))


@pytest.fixture
def evaluate(tmp_path):
    """evaluate(reuse, grow=False, **settings) -> (evaluator, pool): the stateful guest, in-process."""
    from kwserver.evaluation import Evaluator, InstancePool
    from tests.support.modules import in_process_evaluator

    cases = itertools.count()
    with contextlib.ExitStack() as stack:
        def make(reuse, grow=False, **settings):
            directory = tmp_path / f"case{next(cases)}"
            directory.mkdir()
            module = directory / "stateful.wasm"
            grows = "(drop (memory.grow (i32.const 1)))" if grow else ""
            module.write_bytes(wasmtime.wat2wasm(STATEFUL.format(grow=grows)))
            _, registry, _ = stack.enter_context(
                in_process_evaluator(directory, {"stateful": {"module": str(module)}}, **settings))
            pool = InstancePool(registry, reuse=reuse, keep_bytes=32 << 20, budget_bytes=512 << 20)
            stack.callback(pool.clear)
            return Evaluator(registry, pool), pool

        yield make


def _messages(evaluator, count=4):
    return [evaluator.evaluate("stateful", REQUEST)["status"]["message"] for _ in range(count)]


@pytest.mark.parametrize("reuse", [False, None], ids=["fresh", "default"])
def test_no_state_survives_an_evaluation(evaluate, reuse):
    evaluator, pool = evaluate(reuse)
    assert _messages(evaluator) == ["11"] * 4
    # The instance was put back into a new instance's state, not made again each time.
    assert pool.stats()["misses"] == 1 and pool.stats()["hits"] == 3


def test_reusing_instances_keeps_their_state(evaluate):
    evaluator, _ = evaluate(True)
    assert _messages(evaluator) == ["11", "22", "33", "44"]


def test_an_instance_that_grew_its_memory_is_replaced_by_a_new_one(evaluate):
    evaluator, pool = evaluate(False, grow=True)
    assert _messages(evaluator) == ["11"] * 4
    assert pool.stats()["misses"] == 4


def test_without_a_page_scan_every_evaluation_gets_a_new_instance(evaluate, monkeypatch):
    monkeypatch.setattr(pristine, "scanner", lambda: None)
    evaluator, pool = evaluate(False)
    assert _messages(evaluator) == ["11"] * 4
    assert pool.stats()["misses"] == 4
    evaluator, pool = evaluate(None)  # the default then reuses what it cannot put back
    assert _messages(evaluator, 2) == ["11", "22"]


def test_modules_that_are_not_pre_initialised_are_fresh_by_new_instances(evaluate):
    evaluator, pool = evaluate(False, disable_preinitialisation=True)
    assert _messages(evaluator) == ["11"] * 4
    assert pool.stats()["misses"] == 4
