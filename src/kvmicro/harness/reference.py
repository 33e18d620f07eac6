"""The host-speed reference: a fixed workload timed beside every round of a CPU measurement.

Two runs of identical code on a shared machine can differ by far more than either record's
interval: on the 2-core development VM one sweep ran every case 30-43% slower than the sweep
before it while nothing the host-noise guard watches (other processes' CPU time, steal, the
load average) moved - work outside the guest, or the host's clock. No record of one run can
see that; a workload that does not change between the runs can. :func:`reference_probe` times
one such workload (numpy only: a 4 MiB copy and four 64 Ki-element float32 dot products, about
1 ms, the memory-and-arithmetic mix of the CPU kernels), and the Sampler takes one probe after
each round of a CPU case, so that every record carries the host's speed while it was taken
(``host.reference``). Between two runs, ``kvmicro compare`` takes the median of the matched
records' reference ratios as the host's change of speed
(:func:`kvmicro.verdict.between_runs_host_factor`) and divides it out of every case that
carries a reference: what is left is the code's change and each case's own drift, which the
drift allowance covers. The run's median, not each record's own ratio: a record's probes are a
few milliseconds of the host, as noisy as the record.

The workload is kvmicro's own only in its arrays: it calls no kvmicro kernel, so a change to
the code under test cannot change it. A change of numpy (or of the machine) between two runs
can, and the comparison then warns about the differing provenance anyway. GPU cases take no
probe: their timers read the device's clock, whose speed the host's does not predict.
"""

from __future__ import annotations

from statistics import median
from time import perf_counter
from typing import Any

import numpy as np

#: names the workload in records; comparisons adjust only between records of the same probe
PROBE = "numpy-copy4MiB-dot64Ki-v1"
#: timings per probe, of which the median is kept
PROBE_REPEATS = 3
_COPY_ELEMENTS = 1 << 20     # float32: 4 MiB, beyond L2, so the copy streams memory
_DOT_ELEMENTS = 1 << 16      # 256 KiB, in L2: the dot products are arithmetic
_DOTS = 4

_arrays: tuple[np.ndarray, np.ndarray] | None = None


def _buffers() -> tuple[np.ndarray, np.ndarray]:
    """The probe's source and destination, made once per process (8 MiB together)."""
    global _arrays
    if _arrays is None:
        src = np.random.default_rng(0x6B76).random(_COPY_ELEMENTS, dtype=np.float32)
        _arrays = (src, np.empty_like(src))
    return _arrays


def reference_probe() -> float:
    """One probe of the host's speed: the median of :data:`PROBE_REPEATS` timings of the fixed
    workload, in µs."""
    src, dst = _buffers()
    vec = src[:_DOT_ELEMENTS]
    times = []
    for _ in range(PROBE_REPEATS):
        start = perf_counter()
        np.copyto(dst, src)
        for _ in range(_DOTS):
            float(vec @ vec)
        times.append((perf_counter() - start) * 1e6)
    return float(median(times))


def reference_summary(probes_us: list[float]) -> dict[str, Any] | None:
    """What a record keeps of its probes (None when none was taken): the probe's name, the
    median over the record's rounds and each round's probe."""
    if not probes_us:
        return None
    return {"probe": PROBE, "median_us": round(float(median(probes_us)), 6),
            "rounds_us": [round(float(p), 6) for p in probes_us]}


__all__ = ["PROBE", "PROBE_REPEATS", "reference_probe", "reference_summary"]
