"""`kvmicro adr fill|new`: regions, idempotent fills, provenance from the run lines, refusals
that leave the file unchanged, --check for staleness, and scaffolding from the template."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from test_adr_rules import RUN, contiguous, grid

from kvmicro.adr import AdrError, fill, new, parse_regions
from kvmicro.cli import main

ADR = """# ADR: test

Some prose that a fill must never touch.

<!-- kvmicro:hardware results=evidence/cpu-*.jsonl -->
<!-- /kvmicro:hardware -->

Between regions.

<!-- kvmicro:layout-choice results=evidence/cpu-*.jsonl backend=native:cpu -->
old content
<!-- /kvmicro:layout-choice -->
"""


def write_results(path: Path, records: list, run: dict[str, Any] | None = None,
                  append: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(run or RUN)] + [json.dumps(r) for r in records]
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture
def adr(tmp_path: Path) -> Path:
    write_results(tmp_path / "evidence" / "cpu-1.jsonl",
                  grid(NSHD=100.0, HNSD=210.0) + contiguous())
    path = tmp_path / "0001-test.md"
    path.write_text(ADR, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- regions

def test_regions_parse_with_parameters():
    regions = parse_regions(ADR)
    assert [r.key for r in regions] == ["hardware", "layout-choice"]
    assert regions[1].params == {"results": "evidence/cpu-*.jsonl", "backend": "native:cpu"}
    assert ADR[regions[1].start:regions[1].end] == "\nold content\n"
    assert regions[1].line == 10


@pytest.mark.parametrize(("text", "message"), [
    ("<!-- kvmicro:hardware -->\n", "not closed"),
    ("<!-- kvmicro:hardware -->\n<!-- /kvmicro:crossover -->\n", "not closed"),
    ("<!-- /kvmicro:hardware -->\n", "without an opening"),
    ("<!-- kvmicro:hardware -->\n<!-- kvmicro:crossover -->\n<!-- /kvmicro:crossover -->\n"
     "<!-- /kvmicro:hardware -->\n", "contains another"),
    ("<!-- kvmicro:hardware a=1 a=2 -->\n<!-- /kvmicro:hardware -->\n", "a= twice"),
])
def test_malformed_regions_are_refused_with_their_line(text, message):
    with pytest.raises(AdrError, match=message):
        parse_regions(text, "x.md")


# -------------------------------------------------------------------------------------- fill

def test_fill_replaces_regions_and_leaves_the_prose(adr: Path):
    code, messages = fill(adr)
    assert code == 0, messages
    text = adr.read_text()
    assert "old content" not in text
    assert "Some prose that a fill must never touch.\n" in text and "Between regions." in text
    assert "- native:cpu: **NSHD**: faster than HNSD by 2.10x" in text
    assert len(parse_regions(text)) == 2


def test_provenance_comes_from_the_run_lines_not_the_clock(adr: Path):
    fill(adr)
    text = adr.read_text()
    assert "run 2026-01-02T03:04:05+00:00 (git abc123)" in text
    assert "device Test CPU" in text and "cpu-1.jsonl" in text
    assert "rule `layout-choice`" in text


def test_a_second_fill_changes_no_byte(adr: Path):
    fill(adr)
    first = adr.read_bytes()
    code, messages = fill(adr)
    assert code == 0 and adr.read_bytes() == first
    assert "0 changed" in messages[0]


def test_check_passes_when_current_and_fails_when_stale(adr: Path):
    code, _ = fill(adr, check=True)
    assert code == 1                          # never filled: stale
    assert adr.read_text() == ADR             # --check writes nothing
    fill(adr)
    assert fill(adr, check=True)[0] == 0
    adr.write_text(adr.read_text().replace("2.10x", "2.50x"))
    code, messages = fill(adr, check=True)
    assert code == 1 and "stale: layout-choice" in messages[0]


def test_new_data_replaces_old(adr: Path):
    fill(adr)
    later = {**RUN, "started_at": "2026-02-01T00:00:00+00:00", "git_sha": "def456"}
    write_results(adr.parent / "evidence" / "cpu-1.jsonl", grid(NSHD=100.0, HNSD=150.0),
                  run=later, append=True)
    assert fill(adr, check=True)[0] == 1      # the ADR is stale against the new data
    fill(adr)
    text = adr.read_text()
    assert "by 1.50x" in text and "by 2.10x" not in text
    # the layout region used only the new run's records; the contiguous ones are still the old
    layout = text[text.index("kvmicro:layout-choice"):]
    assert "run 2026-02-01T00:00:00+00:00 (git def456)" in layout
    assert "2026-01-02" not in layout.split("/kvmicro:layout-choice")[0]


def test_refuses_missing_evidence_and_leaves_the_file_unchanged(adr: Path):
    adr.write_text(ADR.replace("backend=native:cpu", "backend=mlx:gpu"))
    before = adr.read_bytes()
    code, messages = fill(adr)
    assert code == 1 and adr.read_bytes() == before
    assert any("region layout-choice" in m and "no ok gather_sdpa records" in m
               for m in messages)
    assert "unchanged" in messages[-1]


def test_refuses_a_results_glob_that_matches_nothing(adr: Path):
    adr.write_text(ADR.replace("evidence/cpu-*.jsonl backend", "evidence/gpu-*.jsonl backend"))
    before = adr.read_bytes()
    code, messages = fill(adr, [adr.parent / "evidence" / "cpu-1.jsonl"])
    assert code == 1 and adr.read_bytes() == before
    assert "no results file matches results=evidence/gpu-*.jsonl" in messages[0]


def test_refuses_records_of_another_device(adr: Path):
    other = [dict(r, device="Other CPU") for r in grid(NSHD=100.0, HNSD=200.0, seed=1)]
    for r in other:
        r["seed"] = 1                           # distinct cases, a different machine
    write_results(adr.parent / "evidence" / "cpu-2.jsonl", other)
    before = adr.read_bytes()
    code, messages = fill(adr)
    assert code == 1 and adr.read_bytes() == before
    assert any("several devices (Other CPU; Test CPU)" in m for m in messages)


def test_refuses_a_mismatched_shape_set(adr: Path):
    shapes = [r for r in grid(NSHD=100.0, HNSD=210.0)
              if not (r["layout"] == "HNSD" and r["batch"] == 4)]
    write_results(adr.parent / "evidence" / "cpu-1.jsonl", shapes)
    before = adr.read_bytes()
    code, messages = fill(adr)
    assert code == 1 and adr.read_bytes() == before
    assert any("different shape sets" in m for m in messages)


def test_results_given_on_the_command_line_match_by_file_name(adr: Path, tmp_path: Path):
    elsewhere = write_results(tmp_path / "fresh" / "cpu-9.jsonl", grid(NSHD=100.0, HNSD=300.0))
    code, messages = fill(adr, [elsewhere])
    assert code == 0, messages
    assert "by 3.00x" in adr.read_text() and "cpu-9.jsonl" in adr.read_text()


def test_results_may_lie_anywhere_in_the_repository_relative_to_the_adr(tmp_path: Path):
    # docs/adr/0001.md reading docs/results/: a results= glob that climbs out of the ADR's folder
    write_results(tmp_path / "results" / "gpu-1.jsonl", grid(NSHD=100.0, HNSD=210.0))
    write_results(tmp_path / "results" / "gpu-2.txt", [])     # not matched by the glob
    adr = tmp_path / "adr" / "0001-test.md"
    adr.parent.mkdir()
    adr.write_text(ADR.replace("evidence/cpu-*.jsonl", "../results/gpu-*.jsonl"))
    code, messages = fill(adr)
    assert code == 0, messages
    assert "gpu-1.jsonl" in adr.read_text() and "by 2.10x" in adr.read_text()
    assert fill(adr, check=True)[0] == 0
    # a glob-free path names one file; a missing one is refused, the file unchanged
    adr.write_text(ADR.replace("evidence/cpu-*.jsonl", "../results/gpu-1.jsonl"))
    assert fill(adr)[0] == 0 and "by 2.10x" in adr.read_text()
    adr.write_text(ADR.replace("evidence/cpu-*.jsonl", "../results/gpu-9.jsonl"))
    before = adr.read_bytes()
    code, messages = fill(adr)
    assert code == 1 and adr.read_bytes() == before


def test_gzipped_results_are_read(adr: Path):
    plain = adr.parent / "evidence" / "cpu-1.jsonl"
    packed = plain.with_suffix(".jsonl.gz")
    packed.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    plain.unlink()
    adr.write_text(ADR.replace("cpu-*.jsonl", "cpu-*.jsonl.gz"))
    assert fill(adr)[0] == 0
    assert "cpu-1.jsonl.gz" in adr.read_text()


def test_parameters_split_one_adr_by_backend(adr: Path):
    records = grid(NSHD=100.0, HNSD=210.0) + grid(backend="mlx:cpu", NSHD=300.0, HNSD=100.0)
    write_results(adr.parent / "evidence" / "cpu-1.jsonl", records)
    text = ADR + ("\n<!-- kvmicro:layout-choice results=evidence/cpu-*.jsonl backend=mlx:cpu -->"
                  "\n<!-- /kvmicro:layout-choice -->\n")
    adr.write_text(text)
    assert fill(adr)[0] == 0
    filled = adr.read_text()
    assert "- native:cpu: **NSHD**" in filled and "- mlx:cpu: **HNSD**: faster than NSHD by " \
        "3.00x" in filled


# ---------------------------------------------------------------------------------------- CLI

def test_cli_fill_and_check_exit_statuses(adr: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["adr", "fill", "--check", str(adr)]) == 1
    assert main(["adr", "fill", str(adr)]) == 0
    assert main(["adr", "fill", "--check", str(adr)]) == 0
    adr.write_text(adr.read_text().replace("backend=native:cpu", "backend=nope:cpu"))
    before = adr.read_bytes()
    assert main(["adr", "fill", str(adr)]) == 1
    assert adr.read_bytes() == before
    assert "region layout-choice" in capsys.readouterr().err


def test_cli_fill_of_a_malformed_adr_exits_1(tmp_path: Path):
    bad = tmp_path / "bad.md"
    bad.write_text("<!-- kvmicro:hardware -->\n")
    assert main(["adr", "fill", str(bad)]) == 1


# ---------------------------------------------------------------------------------------- new

TEMPLATE = """# {{number}}. {{title}}

Status: {{status}}; date {{date}}

## Context

## Evidence

{{evidence}}
"""


def test_new_scaffolds_a_filled_adr_from_the_template(tmp_path: Path):
    results = write_results(tmp_path / "evidence" / "cpu-1.jsonl",
                            grid(NSHD=100.0, HNSD=210.0) + contiguous())
    template = tmp_path / "template.md"
    template.write_text(TEMPLATE)
    path, notes = new("Paged KV: layout", [results], template=template)
    assert path == tmp_path / "0001-paged-kv-layout.md"
    text = path.read_text()
    assert text.startswith("# 0001. Paged KV: layout\n")
    assert "date 2026-01-02" in text            # the run's date, not today's
    keys = [r.key for r in parse_regions(text)]
    assert keys[:3] == ["hardware", "layout-choice", "crossover"]
    assert all(r.params["results"] == "evidence/cpu-1.jsonl" for r in parse_regions(text))
    # no paged_sdpa in the evidence: those rules are left out and said to be
    assert "fused-vs-gather" not in keys and any("fused-vs-gather" in n for n in notes)
    assert fill(path, check=True)[0] == 0       # born current
    path2, _ = new("Second", [results], template=template)
    assert path2.name == "0002-second.md"
    with pytest.raises(AdrError, match="exists"):
        new("Paged KV: layout", [results], template=template, out=path)


def test_cli_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    results = write_results(tmp_path / "r.jsonl", grid())
    template = tmp_path / "t.md"
    template.write_text(TEMPLATE)
    out = tmp_path / "adr" / "0007-x.md"
    assert main(["adr", "new", "--title", "X", "--results", str(results), "--template",
                 str(template), "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["adr", "new", "--title", "X", "--results", str(results), "--template",
                 str(tmp_path / "missing.md")]) == 1


def test_record_dicts_are_not_modified_by_a_fill(adr: Path):
    records = grid(NSHD=100.0, HNSD=210.0)
    snapshot = copy.deepcopy(records)
    write_results(adr.parent / "evidence" / "cpu-1.jsonl", records)
    fill(adr)
    assert records == snapshot


def _gpu_run(gpu: str, hostname: str = "gpubox") -> dict[str, Any]:
    devices = {b: {"name": gpu, "kind": "cuda"} for b in ("native:cuda", "cudnn:cuda")}
    devices["mlx:gpu"] = {"name": "MLX GPU (x86_64)", "kind": "gpu"}
    return {**RUN, "host": {"hostname": hostname, "cpu": {"model": "Host CPU"}},
            "devices": devices}


def _gpu_records(backend: str, device: str) -> list:
    return [dict(r, device=device) for r in grid(op="paged_sdpa", backend=backend,
                                                 layouts=("NSHD",), NSHD=100.0)]


def _peer_adr(tmp_path: Path) -> Path:
    path = tmp_path / "gpu.md"
    path.write_text("<!-- kvmicro:native-vs-peer results=evidence/gpu-*.jsonl -->\n"
                    "<!-- /kvmicro:native-vs-peer -->\n")
    return path


def test_backends_naming_one_gpu_differently_on_one_host_are_one_machine(tmp_path: Path):
    records = (_gpu_records("native:cuda", "NVIDIA H200")
               + _gpu_records("cudnn:cuda", "NVIDIA H200")
               + _gpu_records("mlx:gpu", "MLX GPU (x86_64)"))
    write_results(tmp_path / "evidence" / "gpu-1.jsonl", records, run=_gpu_run("NVIDIA H200"))
    adr = _peer_adr(tmp_path)
    code, messages = fill(adr)
    assert code == 0, messages
    assert "devices MLX GPU (x86_64) (mlx:gpu); NVIDIA H200 (cudnn:cuda, native:cuda)" in \
        adr.read_text()


def test_one_device_kind_on_two_gpus_is_refused(tmp_path: Path):
    write_results(tmp_path / "evidence" / "gpu-1.jsonl",
                  _gpu_records("native:cuda", "NVIDIA H100"), run=_gpu_run("NVIDIA H100"))
    write_results(tmp_path / "evidence" / "gpu-2.jsonl",
                  _gpu_records("cudnn:cuda", "NVIDIA H200"), run=_gpu_run("NVIDIA H200"))
    adr = _peer_adr(tmp_path)
    before = adr.read_bytes()
    code, messages = fill(adr)
    assert code == 1 and adr.read_bytes() == before
    assert "several devices (NVIDIA H100; NVIDIA H200) for device kind cuda" in messages[0]


def test_runs_on_two_hosts_are_refused(tmp_path: Path):
    write_results(tmp_path / "evidence" / "gpu-1.jsonl",
                  _gpu_records("native:cuda", "NVIDIA H200"), run=_gpu_run("NVIDIA H200", "a"))
    write_results(tmp_path / "evidence" / "gpu-2.jsonl",
                  _gpu_records("cudnn:cuda", "NVIDIA H200"), run=_gpu_run("NVIDIA H200", "b"))
    code, messages = fill(_peer_adr(tmp_path))
    assert code == 1 and "several hosts (a / Host CPU; b / Host CPU)" in messages[0]


def test_new_gives_each_timer_and_cache_its_own_regions(tmp_path: Path):
    graph = grid(NSHD=100.0, HNSD=210.0)
    host = [dict(r, timer="host", cache="cold:flush") for r in grid(NSHD=100.0, HNSD=150.0)]
    results = write_results(tmp_path / "evidence" / "gpu-1.jsonl",
                            [dict(r, timer="graph") for r in graph] + host)
    template = tmp_path / "template.md"
    template.write_text(TEMPLATE)
    path, _ = new("Two timers", [results], template=template)
    layout = [r.params for r in parse_regions(path.read_text()) if r.key == "layout-choice"]
    assert [(p["timer"], p["cache"]) for p in layout] == [("graph", "hot"), ("host", "cold:flush")]
    text = path.read_text()
    assert "by 2.10x" in text and "by 1.50x" in text
    assert fill(path, check=True)[0] == 0


def test_an_unreadable_gzip_file_is_refused_by_name(adr: Path):
    (adr.parent / "evidence" / "cpu-2.jsonl.gz").write_bytes(b"not gzip")
    adr.write_text(ADR.replace("cpu-*.jsonl", "cpu-*.jsonl*"))
    before = adr.read_bytes()
    assert main(["adr", "fill", str(adr)]) == 1
    assert adr.read_bytes() == before
