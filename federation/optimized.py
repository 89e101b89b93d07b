"""A DataFusion plan's optimized form, worked out once per plan.

Planning a statement asks for its optimized plan from several places (the result's schema, the
whole-statement and sub-plan pushdown decisions, the scans it reads, the audit's backend
statements): DataFusion optimizes afresh at each ask, a third of an ad-hoc join's planning. The
optimized plan is kept beside its frame for as long as the frame lives, and no longer.
"""
from __future__ import annotations

import threading
import weakref

from datafusion import DataFrame
from datafusion.plan import LogicalPlan

_optimized: weakref.WeakKeyDictionary[DataFrame, LogicalPlan] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def optimized_plan(frame: DataFrame) -> LogicalPlan:
    """``frame.optimized_logical_plan()``, optimized at its first ask only. Raises as DataFusion
    does (types it cannot coerce, values it refuses), at every ask."""
    with _lock:
        plan = _optimized.get(frame)
    if plan is None:
        plan = frame.optimized_logical_plan()
        with _lock:
            _optimized[frame] = plan
    return plan
