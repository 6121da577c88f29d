"""Policy evaluation: the registry built at boot, the execution modes, per-worker instance pools,
policies and groups.

The registry is built once in the gunicorn master and is read-only afterwards; forked workers share
it copy-on-write. Each worker links modules and creates instances lazily (`pool`), and evaluates
with the execution mode of each policy (`modes`).
"""

from kwserver.evaluation.evaluator import GROUP_EXPRESSION_ERROR, EvaluationError, Evaluator
from kwserver.evaluation.modes import MODES, ExecutionMode
from kwserver.evaluation.pool import InstancePool, PoolReport
from kwserver.evaluation.registry import LoadedPolicy, PolicyRegistry, UnknownPolicy

__all__ = [
    "GROUP_EXPRESSION_ERROR", "MODES",
    "EvaluationError", "Evaluator", "ExecutionMode", "InstancePool", "LoadedPolicy", "PolicyRegistry",
    "PoolReport", "UnknownPolicy",
]
