"""The measurement harness: timers, cache policies, stopping criteria, statistics and the measure
loop. It times :class:`~kvmicro.backends.base.Prepared` objects and never imports a framework.

    policy = make_cache_policy("cold", backend.device_info(), timer="host")
    prepared = backend.prepare(case, arrays, copies=policy.copies_needed(
        working_set_bytes(case), footprint_bytes(case)))
    m = measure(prepared, MeasureConfig(timer="host"), policy)
    m.stats.median_us, m.stats.ci95_lo_us, m.criterion["converged"]
"""

from __future__ import annotations

from .cache import (
    CACHE_POLICIES,
    CachePolicy,
    ColdFlush,
    ColdRotate,
    HotCache,
    make_cache_policy,
    resolve_cache_name,
)
from .criteria import (
    CRITERIA,
    CiMedianCriterion,
    Criterion,
    SampleCountCriterion,
    StdRelCriterion,
    make_criterion,
)
from .measure import (
    MeasureConfig,
    Measurement,
    Sampler,
    footprint_bytes,
    measure,
    working_set_bytes,
)
from .noise import HostGuard, host_load
from .stats import Stats, check_columns
from .timers import (
    TIMER_CLASSES,
    BatchedTimer,
    DeviceTimer,
    GraphTimer,
    HostTimer,
    Timer,
    make_timer,
)

__all__ = [
    "CACHE_POLICIES", "CRITERIA", "TIMER_CLASSES", "BatchedTimer", "CachePolicy",
    "CiMedianCriterion", "ColdFlush", "ColdRotate", "Criterion", "DeviceTimer", "GraphTimer",
    "HostGuard", "HostTimer", "HotCache", "MeasureConfig", "Measurement", "SampleCountCriterion",
    "Sampler", "Stats", "StdRelCriterion", "Timer", "check_columns", "footprint_bytes",
    "host_load", "make_cache_policy", "make_criterion", "make_timer", "measure",
    "resolve_cache_name", "working_set_bytes",
]
