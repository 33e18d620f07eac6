"""Cross-device agreement: the same few cases measured on every device of a multi-device sweep,
and a report of any device whose numbers differ beyond noise (a throttled or faulty card).

The cases (:func:`agreement_points`) are the ``sdpa_contiguous`` and ``paged_sdpa`` points of the
sweep's largest shape, for each of its backends, timers and caches: memory-bound cases, where a
low clock or a slow memory shows. Each device measures them under a backend name that carries
its index (``native:cuda:1``, :func:`kvmicro.devices.on_device`), so the copies are distinct
records: the device index is part of their identity (``record_key``) through the backend name,
while ordinary dealt records keep the plain backend and are one case whichever device ran them.

:func:`check_agreement` compares every pair of devices on every case with
:func:`kvmicro.verdict.compare_records`: ``faster``/``slower`` is a disagreement (the slower
device is the suspect), ``same`` an agreement, ``unsure`` means the records cannot tell (noisy,
unconverged, or a ratio CI that straddles the threshold) and is reported as such, never as
agreement.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .devices import Device, groups_of, on_device
from .points import Point

#: the ops measured on every device (memory-bound attention: contiguous and paged)
AGREEMENT_OPS: tuple[str, ...] = ("sdpa_contiguous", "paged_sdpa")


def agreement_points(points: Sequence[Point]) -> list[Point]:
    """The points every device measures: of the last (largest) shape group, the
    :data:`AGREEMENT_OPS` points of the first layout and placement, for every backend, timer and
    cache; when the sweep has neither op, the group's first two cases."""
    if not points:
        return []
    group = groups_of(points)[-1]
    chosen = [p for p in group if p.case.op in AGREEMENT_OPS]
    if not chosen:
        cases = list(dict.fromkeys(p.case for p in group))[:2]
        return [p for p in group if p.case in cases]
    paged = [p for p in chosen if p.case.op != "sdpa_contiguous"]
    if paged:   # paged_sdpa of the first layout and placement only
        where = (paged[0].case.layout, paged[0].case.placement)
        chosen = [p for p in chosen if p.case.op == "sdpa_contiguous" or
                  (p.case.layout, p.case.placement) == where]
    return chosen


def agreement_lanes(points: Sequence[Point], devices: Sequence[Device]
                    ) -> dict[Device, list[Point]]:
    """Every device's copy of :func:`agreement_points` (backend names carrying its index)."""
    chosen = agreement_points(points)
    return {d: [on_device(p, d) for p in chosen] for d in devices}


@dataclass(frozen=True)
class PairVerdict:
    """One case measured on two devices: ``verdict`` of ``device`` against ``base``."""

    label: str
    device: str
    base: str
    verdict: str
    ratio: float
    ratio_ci: tuple[float, float]
    reason: str


@dataclass
class AgreementReport:
    """Every pair of devices on every agreement case, and who disagrees."""

    devices: list[str] = field(default_factory=list)
    pairs: list[PairVerdict] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)

    @property
    def disagreements(self) -> list[PairVerdict]:
        return [p for p in self.pairs if p.verdict in ("faster", "slower")]

    @property
    def unsure(self) -> list[PairVerdict]:
        return [p for p in self.pairs if p.verdict == "unsure"]

    @property
    def suspects(self) -> Counter[str]:
        """Per device, the cases on which it was the slower of a disagreeing pair."""
        out: Counter[str] = Counter()
        for p in self.disagreements:
            out[p.device if p.verdict == "slower" else p.base] += 1
        return out

    @property
    def exit_code(self) -> int:
        """1 when a device disagrees, 2 when no case was measured on two devices, else 0."""
        if self.disagreements:
            return 1
        return 0 if self.pairs else 2

    def render(self) -> str:
        lines = [f"agreement across {', '.join(self.devices) or 'no device'}: "
                 f"{len({p.label for p in self.pairs})} case(s), {len(self.pairs)} comparison(s)"]
        for p in self.pairs:
            lo, hi = p.ratio_ci
            lines.append(f"  {p.verdict:<7} {p.device} vs {p.base}: x{p.ratio:.3f} "
                         f"[{lo:.3f}, {hi:.3f}]  {p.label}"
                         + (f"  ({p.reason})" if p.verdict == "unsure" and p.reason else ""))
        for label in self.unpaired:
            lines.append(f"  missing {label}: measured ok on fewer than two devices")
        if self.disagreements:
            for device, n in self.suspects.most_common():
                lines.append(f"DISAGREE: {device} is slower than another device beyond noise on "
                             f"{n} case(s): a throttled or faulty card? (leave it out of "
                             "--devices, or look at its clocks and temperature)")
        elif not self.pairs:
            lines.append("CANNOT TELL: no case was measured on two devices")
        elif self.unsure:
            lines.append(f"agree where it can tell; cannot tell on {len(self.unsure)} of "
                         f"{len(self.pairs)} comparison(s) (see the reasons above): measure "
                         "longer (--max-time) or on a quieter host to decide them")
        else:
            lines.append("AGREE: every device measured every case the same within the threshold")
        return "\n".join(lines)


def _device_of(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(device label, plain backend)`` of an agreement record, None for another record."""
    from .backends.registry import split_name

    try:
        base, index = split_name(str(record.get("backend", "")))
    except Exception:   # a backend this kvmicro does not know: not an agreement record here
        return None
    if index is None:
        return None
    kind = record.get("device_kind") or base.split(":")[1]
    return f"{kind}:{index}", base


def check_agreement(records: Iterable[Mapping[str, Any]], *, threshold: float = 0.05
                    ) -> AgreementReport:
    """Compare the agreement records (backend names with a device index) of every device pair
    case by case (:func:`kvmicro.verdict.compare_records`)."""
    from .record import backend_label, record_key
    from .verdict import compare_records

    by_case: dict[tuple[Any, ...], dict[str, Mapping[str, Any]]] = defaultdict(dict)
    labels: dict[tuple[Any, ...], str] = {}
    devices: set[str] = set()
    for r in records:
        where = _device_of(r)
        if where is None:
            continue
        device, base = where
        devices.add(device)
        plain = {**r, "backend": base}
        key = record_key(plain)
        by_case[key][device] = r   # a resumed file's later copy wins
        labels[key] = (f"{r.get('op')} {backend_label(plain)} {r.get('layout')} "
                       f"{r.get('placement')} ctx{r.get('ctx')} b{r.get('batch')} "
                       f"{r.get('dtype')} {r.get('timer')}/{r.get('cache')}")
    report = AgreementReport(devices=sorted(devices, key=_order))
    for key, per_device in by_case.items():
        ok = {d: r for d, r in per_device.items() if r.get("status") == "ok"}
        if len(ok) < 2:
            report.unpaired.append(labels[key])
            continue
        for base, device in itertools.combinations(sorted(ok, key=_order), 2):
            v = compare_records(ok[device], ok[base], threshold=threshold)
            report.pairs.append(PairVerdict(labels[key], device, base, v.verdict, v.ratio,
                                            tuple(v.ratio_ci), v.reason))  # type: ignore[arg-type]
    return report


def _order(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    return kind, int(index) if index.isdigit() else -1


__all__ = ["AGREEMENT_OPS", "AgreementReport", "PairVerdict", "agreement_lanes",
           "agreement_points", "check_agreement"]
