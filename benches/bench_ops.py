"""Every op of the selected preset on every selected backend, timed by pytest-benchmark.

One benchmark per case (``--kv-preset``, ``--kv-backend``); each is checked against the float64
oracle before it is timed, and grouped by shape so that the table puts the ops, layouts and
backends of one shape side by side. ``kvmicro report`` reads the JSON that
``--benchmark-json`` writes.
"""

from __future__ import annotations

from kvmicro.workload import Case


def test_op(kv_bench, kv_case: Case) -> None:
    kv_bench(kv_case)
