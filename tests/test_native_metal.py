"""native:metal's Python side: availability and refusals here, its case options (the submission
axes) and how they reach records. On Linux the Metal host cannot run; these tests check what can
be checked without it, and the GPU tests at the bottom run only where Metal is."""

from __future__ import annotations

import sys

import pytest

from kvmicro.backends.native_metal import (
    QOS_CLASSES,
    SUBMIT_KEYS,
    NativeMetalBackend,
)
from kvmicro.backends.registry import backend_class, format_spec, parse_spec
from kvmicro.errors import InvalidCase, Unsupported
from kvmicro.workload import Case, materialize


def _case(**kw: object) -> Case:
    base: dict[str, object] = dict(backend="native:metal", op="paged_sdpa", batch=2, q_heads=8,
                                   kv_heads=2, head_dim=64, ctx=37, block_size=16,
                                   layout="NSHD", placement="random", dtype="float16")
    base.update(kw)
    return Case(**base)  # type: ignore[arg-type]


def test_the_registry_points_at_native_metal() -> None:
    assert backend_class("native:metal") is NativeMetalBackend


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal is for machines without Metal")
def test_unavailable_here_with_the_reason() -> None:
    backend = NativeMetalBackend()
    available = backend.availability()
    assert not available
    assert "macOS" in available.reason and sys.platform in available.reason
    case = _case()
    with pytest.raises(Unsupported, match=r"native:metal is not available here: .*macOS"):
        backend.prepare(case, materialize(case))
    with pytest.raises(Unsupported, match="macOS"):
        backend.bandwidth()
    info = backend.device_info()
    assert info.kind == "metal" and info.name == "unavailable"
    assert "macOS" in info.extra["reason"]


def test_options_are_the_submission_axes_with_their_defaults() -> None:
    typed = NativeMetalBackend.parse_options(())
    assert typed == {"priority": "normal", "storage": "shared", "queue": "shared",
                     "per_buffer": 1, "in_flight": 64}
    assert set(SUBMIT_KEYS) | {"priority"} == set(NativeMetalBackend.OPTIONS)


def test_spec_options_are_canonical_and_defaults_dropped() -> None:
    name, options = parse_spec("native:metal[queue=per_stream,storage=private,per_buffer=8,"
                               "in_flight=64,priority=high]")
    assert name == "native:metal"
    assert options == (("per_buffer", "8"), ("priority", "high"), ("queue", "per_stream"),
                       ("storage", "private"))
    assert format_spec(name, options) == ("native:metal[per_buffer=8,priority=high,"
                                          "queue=per_stream,storage=private]")
    assert parse_spec("native:metal[storage=shared,per_buffer=1]") == ("native:metal", ())


@pytest.mark.parametrize("spec, named", [
    ("native:metal[storage=managed]", "managed"),
    ("native:metal[queue=many]", "many"),
    ("native:metal[per_buffer=0]", "0"),
    ("native:metal[per_buffer=5000]", "5000"),
    ("native:metal[in_flight=65]", "65"),
    ("native:metal[priority=realtime]", "realtime"),
    ("native:metal[gpu_priority=high]", "gpu_priority"),
])
def test_bad_options_name_the_value(spec: str, named: str) -> None:
    with pytest.raises(InvalidCase, match=named):
        parse_spec(spec)


def test_submit_options_reach_cpp_as_text_with_defaults_filled() -> None:
    backend = NativeMetalBackend()
    case = _case(options=(("per_buffer", "8"), ("storage", "private")))
    assert backend.submit_options(case) == {"storage": "private", "queue": "shared",
                                            "per_buffer": "8", "in_flight": "64"}
    assert backend.submit_options(_case()) == {"storage": "shared", "queue": "shared",
                                               "per_buffer": "1", "in_flight": "64"}


@pytest.mark.parametrize("priority, qos", [("low", "QOS_CLASS_UTILITY"),
                                           ("normal", "QOS_CLASS_USER_INITIATED"),
                                           ("high", "QOS_CLASS_USER_INTERACTIVE")])
def test_priority_is_the_submitting_threads_qos_class(priority: str, qos: str) -> None:
    backend = NativeMetalBackend()
    options = () if priority == "normal" else (("priority", priority),)
    assert backend.qos_class(_case(options=options)) == qos
    assert QOS_CLASSES[priority] == qos


def test_options_are_part_of_the_case_identity() -> None:
    plain = _case()
    private = _case(options=(("storage", "private"),))
    assert plain != private
    assert plain.label != private.label
    assert "storage=private" in private.label


# ---- on a Mac with Metal only -------------------------------------------------------------------

metal = pytest.mark.skipif(not NativeMetalBackend().availability(),
                           reason="needs macOS with a Metal device and a Metal build")


@metal
@pytest.mark.parametrize("options", [(), (("storage", "private"),),
                                     (("per_buffer", "4"), ("queue", "per_stream"))])
def test_paged_sdpa_matches_the_oracle_on_metal(options: tuple[tuple[str, str], ...]) -> None:
    from kvmicro.check import compare

    case = _case(options=options)
    arrays = materialize(case)
    prepared = NativeMetalBackend().prepare(case, arrays)
    try:
        prepared.run()
        prepared.sync()
        assert compare(case, arrays, prepared.output()).passed
        for key in ("storage", "queue", "QoS", "run() per command buffer"):
            assert key in prepared.kernel
        assert len(prepared.device_times(3)) == 3
        assert all(t > 0 for t in prepared.graph_times(2, 8))
    finally:
        prepared.release()


def test_kvmicro_env_on_macos_says_what_each_axis_controls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmicro import environment
    from kvmicro.backends.native_metal import METAL_AXES

    monkeypatch.setattr(environment.platform, "system", lambda: "Darwin")
    axes = environment.host_info()["metal_axes"]
    assert set(axes) == set(NativeMetalBackend.OPTIONS)
    assert "no public GPU priority" in axes["priority"] and "QoS" in axes["priority"]
    assert all(" not " in text for text in METAL_AXES.values())  # each says what it does not do


def test_kvmicro_env_elsewhere_has_no_metal_axes(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmicro import environment

    monkeypatch.setattr(environment.platform, "system", lambda: "Linux")
    assert "metal_axes" not in environment.host_info()
