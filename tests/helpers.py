"""Helpers the native backends' tests share (tests/ is on sys.path under pytest's default
import mode, so a test module imports this as ``helpers``)."""

from __future__ import annotations

import numpy as np

from kvmicro.workload import Case, Layout


def case_id(case: Case) -> str:
    return (f"{case.op}-{case.dtype}-{case.layout}-D{case.head_dim}-{case.q_heads}:{case.kv_heads}"
            f"-bs{case.block_size}-{case.placement}-ctx{'/'.join(map(str, case.ctx_list))}")


def table_on_unused_blocks(case: Case, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with the block table pointed at other, valid blocks (a bijection onto the pool's
    unused ones): a negative control that a kernel really reads through the table."""
    used = arrays["block_table"][arrays["block_table"] >= 0]
    unused = np.setdiff1d(np.arange(Layout(case.layout).to_logical(arrays["k_pool"]).shape[0]),
                          used)
    wrong = dict(arrays)
    table = arrays["block_table"].copy()
    table[table >= 0] = unused[: used.size]
    wrong["block_table"] = table
    return wrong
