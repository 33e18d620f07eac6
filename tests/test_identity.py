"""A case's identity is complete: backend options are part of the case, parsed once by the
registry into canonical form, carried by records, and part of the key that resume, merge and
compare match on; a case round-trips through its flat form for every field; bad case values are
refused by value."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmicro import InvalidCase
from kvmicro.backends import registry
from kvmicro.backends.base import PRIORITY_OPTION, Backend, Option
from kvmicro.record import KEY_FIELDS, case_key, record_key
from kvmicro.results import case_record
from kvmicro.workload import ALL_LAYOUTS, DTYPES, OPS, PLACEMENTS, Case, Layout


class _Knobs(Backend):
    """A backend class with one option of each kind (never instantiated: the parsers are
    classmethods)."""

    name = "test:knobs"
    OPTIONS: ClassVar[dict[str, Option]] = {
        "kernel": Option("choice", "auto", ("auto", "simt", "mma")),
        "splits": Option("int", 0, minimum=0, maximum=64),
        "pdl": Option("bool", False),
    }


# ------------------------------------------------------------------------------------ options

def test_parse_options_fills_defaults_and_types_values():
    assert _Knobs.parse_options({}) == {"kernel": "auto", "splits": 0, "pdl": False}
    assert _Knobs.parse_options({"kernel": "mma", "splits": "8", "pdl": "true"}) == \
        {"kernel": "mma", "splits": 8, "pdl": True}
    assert _Knobs.parse_options([("splits", 4)])["splits"] == 4


@pytest.mark.parametrize("options,message", [
    ({"kernal": "mma"}, r"unknown option 'kernal'; valid options: kernel, pdl, splits"),
    ({"kernel": "wmma"}, r"option kernel value 'wmma' is not valid; expected one of auto, simt, "
                         "mma"),
    ({"splits": "65"}, r"option splits value '65' is not valid; expected an integer >= 0 and "
                       "<= 64"),
    ({"splits": "-1"}, r"option splits value '-1'"),
    ({"splits": "8x"}, r"option splits value '8x'"),
    ({"splits": True}, r"option splits value True"),
    ({"pdl": "maybe"}, r"option pdl value 'maybe' is not valid; expected true or false"),
])
def test_bad_options_name_the_key_or_value_and_the_valid_ones(options, message):
    with pytest.raises(InvalidCase, match=message):
        _Knobs.parse_options(options)


def test_a_backend_without_options_says_so():
    class Bare(Backend):
        name = "test:bare"

    assert Bare.parse_options(None) == {} and Bare.canonical_options({}) == ()
    with pytest.raises(InvalidCase, match=r"test:bare: unknown option 'x'; it has no options"):
        Bare.parse_options({"x": "1"})


def test_canonical_options_are_sorted_strings_without_defaults():
    assert _Knobs.canonical_options({"splits": 8, "kernel": "auto", "pdl": "yes"}) == \
        (("pdl", "true"), ("splits", "8"))
    assert _Knobs.canonical_options({"splits": "0"}) == ()


def test_a_backend_with_priority_control_has_the_priority_option():
    native_cuda = registry.backend_class("native:cuda")
    assert native_cuda.OPTIONS["priority"] == PRIORITY_OPTION and native_cuda.has_priority
    assert "priority" not in registry.backend_class("native:cpu").OPTIONS


def test_the_registry_splits_a_spec_into_the_plain_name_and_canonical_options():
    assert registry.parse_spec("native:cuda[priority=high]") == \
        ("native:cuda", (("priority", "high"),))
    assert registry.parse_spec("native:cuda:1[priority=normal]") == ("native:cuda:1", ())
    assert registry.parse_spec("torch:cpu") == ("torch:cpu", ())
    assert registry.canonical_spec(" native:cuda[ priority = low ] ") == "native:cuda[priority=low]"


@pytest.mark.parametrize("spec,message", [
    ("native:cpu[priority=high]", r"native:cpu: unknown option 'priority'"),
    ("native:cuda[nonsense=1]", r"unknown option 'nonsense'; valid options: .*priority"),
    ("native:cuda[priority=urgent]", r"priority value 'urgent' is not valid; expected one of low"),
    ("native:cuda[priority]", r"option 'priority' is not key=value"),
    ("native:cuda[priority=high", r"options go in one trailing"),
    ("nativ:cuda[priority=high]", r"unknown backend"),
])
def test_bad_specs_are_refused_by_name(spec, message):
    with pytest.raises(InvalidCase, match=message):
        registry.parse_spec(spec)


def test_backend_lists_keep_commas_inside_brackets():
    assert registry.split_specs("native:cuda[a=1,b=2], torch:cpu") == \
        ["native:cuda[a=1,b=2]", "torch:cpu"]
    assert registry.resolve("native:cuda[priority=high],torch:cpu,native:cuda[priority=normal]") \
        == ["native:cuda[priority=high]", "torch:cpu", "native:cuda"]
    with pytest.raises(InvalidCase, match="without"):
        registry.split_specs("native:cuda[a=1")


def test_priority_flows_into_the_options_of_backends_that_have_it():
    assert registry.with_priority("native:cuda", "high") == "native:cuda[priority=high]"
    # a spec's own priority is more specific than the command line's
    assert registry.with_priority("native:cuda[priority=low]", "high") == \
        "native:cuda[priority=low]"
    assert registry.with_priority("native:cuda[priority=normal]", "high") == "native:cuda"
    assert registry.with_priority("torch:cpu", "high") == "torch:cpu"
    with pytest.raises(InvalidCase, match="unknown priority 'urgent'"):
        registry.with_priority("native:cuda", "urgent")


def test_a_case_reads_its_priority_from_its_options():
    backend = registry.get_backend("native:cuda")
    assert backend.submission_priority(Case(backend="native:cuda[priority=high]")) == "high"
    assert backend.submission_priority(Case(backend="native:cuda")) == "normal"


# --------------------------------------------------------------------------------- case + key

def test_a_spec_given_as_the_backend_becomes_name_plus_options():
    case = Case(backend="native:cuda[priority=high]")
    assert case.backend == "native:cuda" and case.options == (("priority", "high"),)
    assert case.spec == "native:cuda[priority=high]"
    assert Case(backend="native:cuda", options={"priority": "high"}) == case


def test_options_are_part_of_the_identity():
    plain, high = Case(backend="native:cuda"), Case(backend="native:cuda[priority=high]")
    assert case_key(plain, "graph", "hot") != case_key(high, "graph", "hot")
    rec = case_record(high, status="skipped", reason="no GPU", timer="graph", cache="hot")
    assert rec["backend"] == "native:cuda" and rec["options"] == {"priority": "high"}
    assert record_key(rec) == case_key(high, "graph", "hot")
    assert "options" in KEY_FIELDS and "scale" in KEY_FIELDS


def test_a_version_1_record_has_no_options_and_keys_by_its_priority_field():
    rec = case_record(Case(backend="native:cuda"), status="skipped", reason="x", timer="graph",
                      cache="hot")
    v1 = {k: v for k, v in rec.items() if k != "options"}
    assert record_key(v1) == record_key(rec)
    assert record_key({**v1, "priority": "high"}) == \
        case_key(Case(backend="native:cuda[priority=high]"), "graph", "hot")


def test_a_custom_scale_survives_the_flat_form_and_enters_the_key():
    case = Case(scale=0.3)
    assert Case.from_flat(case.flat()).scale == 0.3
    assert case_key(case, "host", "hot") != case_key(Case(), "host", "hot")
    # the default scale spelled out is the same case
    assert Case(scale=1 / math.sqrt(128)) == Case()


_ctx_values = st.integers(1, 5000)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    batch = draw(st.integers(1, 6))
    kv_heads = draw(st.integers(1, 8))
    ragged = draw(st.booleans())
    ctx = tuple(draw(st.lists(_ctx_values, min_size=batch, max_size=batch))) if ragged \
        else draw(_ctx_values)
    q_len = draw(st.integers(1, min(ctx) if ragged else ctx).filter(lambda q: q <= 4))
    options = draw(st.dictionaries(st.sampled_from(["kernel", "splits", "priority", "x_1"]),
                                   st.sampled_from(["mma", "8", "high", "true"]), max_size=3))
    return Case(op=draw(st.sampled_from(OPS)),
                backend=draw(st.sampled_from(["native:cpu", "torch:cpu", "native:cuda:1"])),
                batch=batch, q_heads=kv_heads * draw(st.integers(1, 7)), kv_heads=kv_heads,
                head_dim=draw(st.sampled_from([64, 80, 128, 256])), ctx=ctx,
                block_size=draw(st.sampled_from([1, 16, 32])),
                layout=draw(st.sampled_from(ALL_LAYOUTS)),
                placement=draw(st.sampled_from(PLACEMENTS)),
                slack=draw(st.floats(1.0, 8.0, allow_nan=False)),
                dtype=draw(st.sampled_from(DTYPES)), q_len=q_len,
                scale=draw(st.none() | st.floats(1e-3, 10.0, allow_nan=False)),
                seed=draw(st.integers(0, 2**31)), options=options)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_every_case_round_trips_through_its_flat_form(case):
    back = Case.from_flat(case.flat())
    assert back == case
    assert back.options == case.options and back.scale == case.scale and back.ctx == case.ctx
    assert case_key(back, "host", "hot") == case_key(case, "host", "hot")


@settings(max_examples=100, deadline=None)
@given(cases())
def test_every_case_round_trips_through_a_record(case):
    from kvmicro.record import Record

    rec = case_record(case, status="error", reason="x", timer="host", cache="hot")
    assert Record.from_json(rec).case == case
    assert record_key(rec) == case_key(case, "host", "hot") == Record.from_json(rec).key


# ------------------------------------------------------------------------ case validation

@pytest.mark.parametrize("changes,message", [
    (dict(batch=2, ctx="37"), r"ctx '37' must be an integer or a list of integers"),
    (dict(ctx=None), r"ctx None must be an integer or a list of integers"),
    (dict(ctx=20.7), r"ctx 20.7 must be an integer"),
    (dict(ctx=[20.7]), r"ctx \[20.7\] holds 20.7, not an integer"),
    (dict(ctx=np.array([20.7])), r"holds 20.7, not an integer"),
    (dict(ctx=[True]), r"holds True"),
    (dict(batch=2, ctx=[[1, 2], [3, 4]]), r"holds \[1, 2\]"),
    (dict(ctx=0), r"ctx 0 must be a positive"),
    (dict(batch=2, ctx=[5]), r"ctx has 1 entries \[5\] but batch is 2"),
    (dict(batch=2.0), r"batch 2.0 must be a positive integer"),
    (dict(batch=True), r"batch True must be a positive integer"),
    (dict(layout=None), r"layout None must be a string"),
    (dict(layout="NSHD\x00junk"), r"is not a permutation"),
    (dict(slack=None), r"slack None must be a number >= 1.0"),
    (dict(slack="2"), r"slack '2' must be a number"),
    (dict(slack=float("nan")), r"slack nan"),
    (dict(scale="x"), r"scale 'x' must be a finite number"),
    (dict(scale=float("inf")), r"scale inf"),
    (dict(seed=-1), r"seed -1 must be an integer >= 0"),
    (dict(op=None), r"unknown op None"),
    (dict(placement=None), r"unknown placement None"),
    (dict(backend=None), r"backend None must be a string"),
    (dict(options="priority=high"), r"options 'priority=high' must be key=value pairs"),
    (dict(options={"Bad-Key": "1"}), r"option name 'Bad-Key'"),
    (dict(options={"k": "a,b"}), r"option k value 'a,b'"),
])
def test_bad_case_values_are_named(changes, message):
    with pytest.raises(InvalidCase, match=message):
        Case(**changes)


_not_a_ctx = st.one_of(st.none(), st.text(min_size=1), st.floats(), st.booleans(),
                       st.lists(st.floats(allow_nan=False).filter(lambda f: f != int(f)
                                                                  if math.isfinite(f) else True),
                                min_size=1, max_size=1),
                       st.dictionaries(st.text(), st.integers(), max_size=1))


@settings(max_examples=200, deadline=None)
@given(_not_a_ctx)
def test_anything_but_ints_as_ctx_is_refused_naming_it(ctx):
    with pytest.raises(InvalidCase, match=r"^ctx "):
        Case(batch=1, ctx=ctx)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-10, 10_000), min_size=1, max_size=6))
def test_integer_ctx_lists_are_taken_or_refused_by_value(values):
    if min(values) <= 0:
        with pytest.raises(InvalidCase, match=r"ctx -?\d+ must be a positive"):
            Case(batch=len(values), ctx=values, q_len=1)
    else:
        case = Case(batch=len(values), ctx=values)
        assert case.ctx_list == tuple(values) and case.ctx == tuple(values)
        assert Case(batch=len(values), ctx=np.array(values)).ctx == tuple(values)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=6), st.text(alphabet="NSHDnshdX\x00", max_size=6)))
def test_a_layout_is_a_permutation_of_nshd_in_any_case_or_refused(text):
    if len(text) == 4 and sorted(text.upper()) == sorted("NSHD"):
        assert Layout.parse(text).order == text.upper()
        assert Case(layout=text).layout == text.upper()
    else:
        with pytest.raises(InvalidCase, match=r"^layout .* is not a permutation of N, S, H, D"):
            Layout.parse(text)


@given(st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=1), max_size=4)))
def test_a_layout_that_is_not_a_string_is_refused_naming_it(value):
    with pytest.raises(InvalidCase, match=r"^layout .* must be a string"):
        Layout.parse(value)


# ------------------------------------------------------- options through resume, merge, report

def _ok(case: Case, median_us: float) -> dict:
    from kvmicro.derived import derive
    from kvmicro.harness.measure import Measurement
    from kvmicro.harness.stats import Stats

    samples = [median_us * (1 + 0.001 * i) for i in range(10)]
    m = Measurement(samples_us=samples, stats=Stats.from_samples(samples), timer="graph",
                    cache={"name": "hot", "bytes": 0, "pools": 1, "cache_bytes": 1 << 20},
                    criterion={"name": "ci-median", "params": {}, "converged": True,
                               "why_not": ""}, k=8, dropped=0, elapsed_s=0.1)
    return case_record(case, status="ok", measurement=m, derived=derive(case, median_us))


def test_resume_and_merge_keep_two_variants_of_a_case_apart(tmp_path):
    import warnings

    from kvmicro.results import ResultsWriter, merge, read_results

    plain = Case(backend="native:cuda")
    high = plain.with_(options={"priority": "high"})
    path = tmp_path / "a.jsonl"
    with ResultsWriter(path, {"argv": []}) as w:
        w.write(_ok(plain, 10.0))
    with ResultsWriter(path, {"argv": []}, resume=True) as w:
        assert case_key(plain, "graph", "hot") in w.done_keys
        assert case_key(high, "graph", "hot") not in w.done_keys   # not measured yet
        w.write(_ok(high, 11.0))
    other = tmp_path / "b.jsonl"
    with ResultsWriter(other, {"argv": []}) as w:
        w.write(_ok(high, 11.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert merge([path, other], tmp_path / "m.jsonl") == 3
    repeated = [str(c.message) for c in caught if "more than once" in str(c.message)]
    assert repeated == ["merge: 1 case(s) appear more than once across the inputs; all copies "
                        "are kept"]
    _, cases_read = read_results(tmp_path / "m.jsonl")
    assert sorted(tuple(sorted(r["options"].items())) for r in cases_read) == \
        [(), (("priority", "high"),), (("priority", "high"),)]


def test_the_report_tables_each_variant_under_its_spec():
    from kvmicro.report import render

    plain = Case(backend="native:cuda")
    text = render([_ok(plain, 10.0), _ok(plain.with_(options={"priority": "high"}), 20.0)])
    assert "native:cuda[priority=high]" in text
    assert text.count("native:cuda") >= 2 and "10" in text and "20" in text


def test_the_command_lines_priority_becomes_the_option_of_the_backends_that_have_it(capsys):
    from kvmicro.cli import main

    try:
        assert main(["sweep", "--preset", "smoke", "--backend",
                     "native:cuda,native:cuda[priority=low],torch:cpu", "--priority", "high",
                     "--op", "paged_sdpa", "--dry-run"]) == 0
    finally:
        registry.set_priority("normal")   # the deprecated process-wide shim the CLI still sets
    out = capsys.readouterr().out
    assert "native:cuda[priority=high]" in out and "native:cuda[priority=low]" in out
    assert "torch:cpu[" not in out and "torch:cpu" in out


def test_a_variants_overhead_is_against_its_own_contiguous_twin():
    from kvmicro.points import Point, contiguous_key

    paged = Case(op="paged_sdpa", backend="native:cuda[priority=high]", layout="HNSD")
    twin = paged.with_(op="sdpa_contiguous", layout="NSHD")
    plain_twin = twin.with_(options=())
    key = contiguous_key(Point(paged, "graph", "hot"))
    assert key == contiguous_key(Point(twin, "graph", "hot"))
    assert key != contiguous_key(Point(plain_twin, "graph", "hot"))
