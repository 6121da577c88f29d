"""The admission pipeline of one request, in the reference server's order:
policy lookup, always-accept namespace, stored initialisation error, evaluation, then the
origin-specific post-processing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kwserver import admission
from kwserver.admission import EvaluationRequest
from kwserver.evaluation import Evaluator, PolicyRegistry

log = logging.getLogger(__name__)

VALIDATE, AUDIT, VALIDATE_RAW = "validate", "audit", "validate_raw"


@dataclass(slots=True)
class EvaluationRecord:
    """What metrics need to know about one evaluation (vanilla decision, not the post-processed one)."""

    policy_id: str
    policy_mode: str
    origin: str
    request: EvaluationRequest
    accepted: bool
    mutated: bool
    error_code: int | None
    seconds: float | None  # None when nothing was evaluated (initialisation error)
    initialization_error: str | None = None


class AdmissionService:
    def __init__(self, registry: PolicyRegistry, evaluator: Evaluator, *,
                 always_accept_namespace: str | None = None,
                 observe: Callable[[EvaluationRecord], None] | None = None):
        self.registry = registry
        self.evaluator = evaluator
        self.always_accept_namespace = always_accept_namespace
        self.observe = observe or (lambda record: None)

    def use(self, registry: PolicyRegistry, evaluator: Evaluator) -> None:
        """Serve a new configuration (after a reload, in the master, before new workers fork)."""
        self.registry = registry
        self.evaluator = evaluator

    def review(self, policy_id: str, request: EvaluationRequest, origin: str) -> dict[str, Any]:
        """The AdmissionResponse for one request; raises UnknownPolicy or EvaluationError."""
        mode = self.registry.policy_mode(policy_id)
        if (origin != VALIDATE_RAW and self.always_accept_namespace is not None
                and request.namespace == self.always_accept_namespace):
            self.observe(EvaluationRecord(policy_id, mode, origin, request, True, False, None, 0.0))
            return admission.admission_response(request.uid, True)

        error = self.registry.init_errors.get(policy_id)
        if error is not None:
            # Checked before post-processing: rejects even in monitor mode and on /audit.
            self.observe(EvaluationRecord(policy_id, mode, origin, request, False, False, 500, None, error))
            return admission.reject(request.uid, error, 500)

        started = time.perf_counter()
        vanilla = self.evaluator.evaluate(policy_id, request)
        self.observe(EvaluationRecord(
            policy_id, mode, origin, request, vanilla["allowed"], "patch" in vanilla,
            (vanilla.get("status") or {}).get("code"), time.perf_counter() - started,
        ))
        if origin == AUDIT:
            return vanilla
        if mode == "monitor":
            log.info("policy evaluation (monitor mode): policy %s, allowed %s, status %s",
                     policy_id, vanilla["allowed"], vanilla.get("status"))
        spec = self.registry.specs.get(policy_id)  # None for groups: no mutation, no custom message
        return admission.post_process(
            vanilla, policy_id=policy_id, policy_mode=mode,
            allowed_to_mutate=spec.allowed_to_mutate if spec else False,
            custom_message=spec.message if spec else None,
        )
