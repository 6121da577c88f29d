"""Evaluation of one request by a policy or a policy group: the vanilla response, before the
server's post-processing. The execution mode of each policy does the mode-specific part."""

from __future__ import annotations

import logging
from typing import Any

from kwserver import admission
from kwserver.admission import EvaluationRequest
from kwserver.config import PolicyGroupSpec
from kwserver.evaluation.modes import mode_named
from kwserver.evaluation.pool import InstancePool
from kwserver.evaluation.registry import LoadedPolicy, PolicyRegistry, UnknownPolicy
from kwserver.expressions import ExpressionError, evaluate
from kwserver.runtime import GuestCallFailure, GuestTimeout, InstantiationFailure

log = logging.getLogger(__name__)

GROUP_MUTATION_MESSAGE = "mutation is not allowed inside of policy group"
# The reference's prefix for a group expression that fails; kwserver also uses it for one that is
# invalid at boot under --continue-on-errors, so clients see the same text either way.
GROUP_EXPRESSION_ERROR = "error evaluating policy group expression"


class EvaluationError(Exception):
    """The evaluation could not run at all (HTTP 500 "Something went wrong"); logged, never shown."""


class Evaluator:
    """Computes the vanilla response of a policy or group for one request (before post-processing)."""

    def __init__(self, registry: PolicyRegistry, pool: InstancePool):
        self.registry = registry
        self.pool = pool

    def evaluate_policy(self, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any]:
        mode = mode_named(policy.module.execution_mode)
        refusal = mode.refusal(policy, request)
        if refusal is not None:
            return refusal
        pool = self.pool
        try:
            instance = pool.acquire(policy)
            try:
                answer = mode.evaluate(instance, policy, request)
            except BaseException:
                pool.release(policy, instance, reusable=False)
                raise
            pool.release(policy, instance, reusable=True)
            return answer
        except GuestTimeout as exc:
            log.warning("policy %s: evaluation interrupted, execution deadline exceeded", policy.name)
            return mode.timed_out(request, exc)
        except GuestCallFailure as exc:
            return mode.failed(request, exc)
        except InstantiationFailure as exc:
            raise EvaluationError(f"policy {policy.name}: {exc}") from exc

    def evaluate_group(self, group: PolicyGroupSpec, request: EvaluationRequest) -> dict[str, Any]:
        results: dict[str, dict[str, Any]] = {}

        def run_member(member: str) -> bool:
            member_id = f"{group.name}/{member}"
            error = self.registry.init_errors.get(member_id)
            if error is not None:
                response = admission.reject(request.uid, error, 500)
            else:
                try:
                    response = self.evaluate_policy(self.registry.policies[member_id], request)
                except EvaluationError as exc:
                    raise ExpressionError(str(exc)) from exc
            if "patch" in response:
                response = admission.reject(request.uid, GROUP_MUTATION_MESSAGE)
            results[member] = response  # no memoisation: a second call re-evaluates, the last one wins
            return response["allowed"]

        try:
            if group.tree is None:  # invalid at boot; the service answers with the stored error first
                raise ExpressionError(group.expression_error)
            allowed = evaluate(group.tree, run_member)
        except ExpressionError as exc:
            return admission.reject(request.uid, f"{GROUP_EXPRESSION_ERROR}: {exc}", 500)
        if allowed:
            return admission.admission_response(request.uid, True)
        causes = [
            admission.cause((response.get("status") or {}).get("message"), f"spec.policies.{member}")
            for member, response in results.items()
            if not response["allowed"]
        ]
        return admission.admission_response(
            request.uid, False, status=admission.status(group.message, causes=causes)
        )

    def evaluate(self, policy_id: str, request: EvaluationRequest) -> dict[str, Any]:
        group = self.registry.groups.get(policy_id)
        if group is not None:
            return self.evaluate_group(group, request)
        policy = self.registry.policies.get(policy_id)
        if policy is None:
            raise UnknownPolicy(policy_id)
        return self.evaluate_policy(policy, request)
