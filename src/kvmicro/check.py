"""Comparing a backend's result with the float64 oracle; the matrix `kvmicro check` runs.

Tolerances are per dtype for attention (the output is rounded to the dtype, accumulated in float32),
widened only where the scale makes float32 scores coarser than that (``score_rounding_bound``);
gather and append move bits, so they must match exactly. Gather is compared on the positions a
sequence actually holds (``t < ctx[b]``): what a backend leaves in padding is unspecified.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import oracle
from .workload import ATTENTION_OPS, OPS, PLACEMENTS, PRESET_LAYOUTS, Case

#: max |out - ref| allowed for attention outputs, by dtype (values are O(1): inputs are N(0, 1))
ATTENTION_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


@dataclass(frozen=True)
class CheckResult:
    max_abs_err: float
    tolerance: float
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_err": self.max_abs_err, "tolerance": self.tolerance,
                "passed": self.passed, "detail": self.detail}


#: float32's unit roundoff: the relative error of one rounding
FLOAT32_ROUNDOFF = 2.0 ** -24


def tolerance(case: Case, arrays: dict[str, np.ndarray] | None = None) -> float:
    """max |out - ref| a backend's output may have: 0 for the byte movers; for attention the
    dtype's tolerance, or, where ``arrays`` are given and it is larger, what float32 scores can
    cost at this scale (``score_rounding_bound``)."""
    if case.op not in ATTENTION_OPS:
        return 0.0
    base = ATTENTION_TOLERANCE[case.dtype]
    return base if arrays is None else max(base, score_rounding_bound(case, arrays))


def score_rounding_bound(case: Case, arrays: dict[str, np.ndarray]) -> float:
    """How far float32 rounding of the scores can move an attention output at this scale.

    Kernels compute the scores ``scale * q.k`` in float32 (docs/backends.md), so a score carries
    an error of about one rounding of its magnitude, at most ``|scale| * |q| * |k|``
    (Cauchy-Schwarz; ``|k| <= sqrt(D) * max|k|``). A softmax-weighted sum moves by at most twice
    the largest score error times the largest ``|v|``. At the default scale this stays below the
    dtype tolerances; at large scales (scores in the thousands) it is what float32 can do. 0 where
    an input is not finite (the NaN contract is checked as NaN, not by tolerance)."""
    keys = ("k_dense", "v_dense") if case.op == "sdpa_contiguous" else ("k_pool", "v_pool")
    q, k, v = arrays["q"], arrays[keys[0]], arrays[keys[1]]
    with np.errstate(invalid="ignore", over="ignore"):
        q_norm = float(np.sqrt(np.square(q, dtype=np.float64).sum(axis=-1)).max(initial=0.0))
        k_max = float(np.abs(k).max(initial=0))
        v_max = float(np.abs(v).max(initial=0))
    bound = (2.0 * FLOAT32_ROUNDOFF * abs(case.softmax_scale) * q_norm
             * np.sqrt(case.head_dim) * k_max * v_max)
    return float(bound) if np.isfinite(bound) else 0.0


def _max_abs(out: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, str]:
    out = np.asarray(out, dtype=np.float64)
    if out.shape != ref.shape:
        return float("inf"), f"shape {out.shape} != expected {ref.shape}"
    diff = np.abs(out - ref)
    if mask is not None:
        diff = np.where(mask, diff, 0.0)
    if np.isnan(diff).any():
        return float("inf"), f"{int(np.isnan(diff).sum())} NaN values"
    return float(diff.max(initial=0.0)), ""


def compare(case: Case, arrays: dict[str, np.ndarray], out: Any, ref: Any = None) -> CheckResult:
    """Check ``out`` (a backend's result) against the oracle's result ``ref`` (computed if None)."""
    if ref is None:
        ref = oracle.run(case, arrays)
    tol = tolerance(case, arrays)
    if case.op in ATTENTION_OPS:
        err, detail = _max_abs(out, ref)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            return CheckResult(float("inf"), tol, False, f"{case.op} must return (k, v)")
        mask = None
        if case.op == "gather":
            positions = np.arange(ref[0].shape[2])
            mask = (positions[None, :] < arrays["ctx"][:, None])[:, None, :, None]
        errs = [_max_abs(o, r, mask) for o, r in zip(out, ref, strict=False)]
        err = max(e for e, _ in errs)
        detail = "; ".join(d for _, d in errs if d)
    passed = bool(err <= tol) and not detail
    return CheckResult(err, tol, passed, detail)


def check_matrix(ops: tuple[str, ...] = OPS, quick: bool = False) -> Iterator[Case]:
    """The odd-shape matrix (backend left as ``"?"``; the caller sets it).

    Covers head_dim 64/80/128/256, GQA ratios 1/4/7, ragged contexts whose last block is partly
    filled, block sizes 1/16/64, each preset layout plus a non-preset permutation, each placement
    and each dtype. Each axis is varied around a base case rather than crossed in full, so the
    matrix stays a few hundred cases.
    """
    base = dict(batch=3, q_heads=8, kv_heads=2, head_dim=80, ctx=(37, 130, 5), block_size=16,
                layout="NSHD", placement="random", dtype="float16", seed=11)
    variants: list[dict[str, Any]] = [{}]
    variants += [{"head_dim": d} for d in (64, 128, 256)]
    variants += [{"q_heads": 4, "kv_heads": 4}, {"q_heads": 28, "kv_heads": 4},
                 {"q_heads": 14, "kv_heads": 2, "head_dim": 64}]
    variants += [{"block_size": 1, "ctx": (9, 23, 1)}, {"block_size": 64, "ctx": (65, 200, 3)}]
    variants += [{"layout": lay} for lay in (*PRESET_LAYOUTS[1:], "SDNH", "DHSN")]
    variants += [{"placement": p} for p in PLACEMENTS if p != "random"]
    variants += [{"dtype": d} for d in ("bfloat16", "float32")]
    variants += [{"batch": 1, "ctx": 300, "q_heads": 7, "kv_heads": 1, "head_dim": 128}]
    if not quick:
        # crossings that exercise the slowest paths: odd layouts in every dtype
        variants += [{"layout": lay, "dtype": d} for lay in ("HNSD", "NHSD", "SDNH")
                     for d in ("bfloat16", "float32")]
        variants += [{"block_size": 1, "ctx": (9, 23, 1), "layout": "HNSD", "dtype": "float32"}]
    for op in ops:
        for v in variants:
            yield Case(op=op, backend="?", **{**base, **v})
