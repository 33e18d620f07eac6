"""The kernel-experiment scripts: the SASS loop scan, and the kernel patches still fit the
sources they patch (a source change that breaks a patch fails here, not on the GPU machine)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LISTING = """
        Function : _Z3fooPagedSrc_mma
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   HMMA.16816.F32 R8, R2, R4, R8 ;
        /*0030*/                   HMMA.16816.F32 R12, R2, R4, R12 ;
        /*0040*/              @P0 BRA 0x10 ;
        /*0050*/                   FFMA R3, R3, R3, R3 ;
        /*0060*/              @P1 BRA 0x0 ;
        /*0070*/                   EXIT ;
        Function : _Z3barDenseSrc_mma
        /*0000*/                   EXIT ;
"""


def test_the_main_loop_is_the_smallest_range_holding_every_hmma(tmp_path: Path) -> None:
    sass = load("sass_loops")
    path = tmp_path / "k.sass"
    path.write_text(LISTING)
    kernels = sass.paged_kernels(str(path), ["mma"])
    assert list(kernels) == ["_Z3fooPagedSrc_mma"]  # DenseSrc kernels are left out
    listing = kernels["_Z3fooPagedSrc_mma"]
    assert sass.main_loop(listing) == (4, "0x10", "0x40")
    assert sass.loops(listing) == [(7, 1, 2, 1), (4, 1, 2, 0)]


@pytest.mark.parametrize("mode", ["pad_args", "noinline", "relive", "bounds_last", "bounds"])
def test_the_combine_last_patches_apply_to_the_current_sources(tmp_path: Path, mode: str) -> None:
    patch = load("kernel_patches")
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    before = {p: p.read_text() for p in (tmp_path / "csrc" / "cuda").glob("*.[ch]*")}
    patch.PATCHES[mode](str(tmp_path))
    changed = [p.name for p, text in before.items() if p.read_text() != text]
    expected = {"pad_args": ["kernels.h"],
                "noinline": ["attention_common.cuh"],
                "relive": ["attention_async.cuh", "attention_common.cuh", "attention_mma.cuh"],
                "bounds_last": ["attention_async.cuh", "attention_mma.cuh"],
                "bounds": ["attention_async.cuh", "attention_mma.cuh"]}
    assert sorted(changed) == expected[mode]
    common = (tmp_path / "csrc" / "cuda" / "attention_common.cuh").read_text()
    async_kernel = (tmp_path / "csrc" / "cuda" / "attention_async.cuh").read_text()
    if mode == "pad_args":
        assert "OpParams unused_p;" in (tmp_path / "csrc" / "cuda" / "kernels.h").read_text()
    elif mode == "noinline":
        assert "__device__ __noinline__ void merge_splits" in common
    elif mode == "relive":
        assert "slice_after_loop" in common
        assert "slice_after_loop<kMmaHeads>(a)" in async_kernel
    else:
        minimum = "C == AttnCombine::kLast ? 2 : 0" if mode == "bounds_last" else "2"
        assert f"__launch_bounds__(kAttnThreads, {minimum})" in async_kernel


def row(slot: int, points: tuple[int, ...], sm: int, cycle_base: int) -> tuple[int, ...]:
    """A probe row: the five points in the global timer (ns, 0: not stamped), the SM, and the
    points in an SM cycle counter at 2 GHz that started at cycle_base."""
    cycles = tuple(cycle_base + 2 * (p - points[0]) if p else 0 for p in points)
    return (slot, *points, sm, *cycles)


def test_the_timeline_summary_places_blocks_by_the_timer_and_times_phases_in_cycles() -> None:
    timeline = load("timeline")
    b = 1_764_000_000_000_000_000  # global timer, ns since 1970: past the 2**53 a float holds
    split = [row(0, (b, b + 500, b + 1500, b + 9500, b + 10000), 3, 7_000),
             row(1, (b + 200, b + 900, b + 2100, b + 9900, b + 10600), 3, 123_456),
             row(2, (b + 400, 0, 0, 0, 0), 7, 55)]  # past its sequence's end: it returned
    # a combine row: entry, released, statistics reduced, rows summed, exit
    combine = [row(0, (b + 9000, b + 10900, b + 11200, b + 11700, b + 12000), 5, 99)]
    s = timeline.summarize(split, combine)
    assert (s["split_blocks"], s["working_blocks"]) == (3, 2)
    assert (s["sms"], s["most_blocks_per_sm"]) == (2, 2)
    assert s["clock_ghz"] == pytest.approx(2.0)
    assert s["timer_step_ns"] == 100  # b + 400 .. b + 500, the closest two stamps
    assert s["entry"] == {"min": 0.0, "median": 0.2, "max": 0.4}
    assert s["to_slice"] == {"min": 0.5, "median": 0.6, "max": 0.7}  # only blocks with a slice
    assert s["to_first_tile"]["median"] == pytest.approx(1.1)
    assert s["main_loop"]["max"] == pytest.approx(8.0)
    assert s["to_exit"]["max"] == pytest.approx(0.7)
    assert s["split_exit"]["max"] == pytest.approx(10.6)
    assert s["combine_released"]["min"] == pytest.approx(10.9)
    assert s["combine_to_stats"]["max"] == pytest.approx(0.3)  # cycles at the split blocks' clock
    assert s["combine_to_sum"]["median"] == pytest.approx(0.5)
    assert s["combine_to_exit"]["median"] == pytest.approx(0.3)
    assert s["span"] == pytest.approx(12.0)
    text = timeline.report("case", 13.5, s)
    assert "span of the last op 12.00 µs (the rest, 1.50 µs, lies between ops)" in text
    assert "phases at 2.000 GHz" in text
    # Blocks 0 and 1 as two units (one split each): the later unit ends where it ends; balanced
    # over the grid, at their mean exit. As the two splits of one unit, both at the mean.
    assert s["balanced_in_unit_exit"] == pytest.approx(10.6)
    assert s["balanced_exit"] == pytest.approx(10.3)
    assert timeline.summarize(split, combine, splits=2)["balanced_in_unit_exit"] == \
        pytest.approx(10.3)
    assert "balanced in each unit / in the grid   10.60 / 10.30" in text
    # Blocks 0 and 1 share SM 3 and end 0.6 µs apart; a block on SM 8 ending at 12 µs puts the
    # SMs' mean ends (10.3 and 12.0 µs) 1.7 µs apart.
    assert s["sm_exit_gap"] == pytest.approx(0.6)
    assert s["sm_mean_exit_spread"] == pytest.approx(0.0)
    other_sm = row(3, (b + 100, b + 600, b + 1600, b + 9000, b + 12000), 8, 0)
    assert timeline.summarize([*split, other_sm], combine)["sm_mean_exit_spread"] == \
        pytest.approx(1.7)


def test_the_timeline_report_is_rebuilt_from_the_rows_a_raw_run_wrote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    timeline = load("timeline")
    b = 1_764_000_000_000_000_000
    split = [row(0, (b, b + 500, b + 1500, b + 9500, b + 10000), 3, 7_000),
             row(1, (b + 200, b + 900, b + 2100, b + 9900, b + 10600), 4, 0)]
    combine = [row(0, (b + 9000, b + 10900, 0, 0, b + 12000), 5, 99)]
    record = {"spec": "native:cuda", "shape": "64/1", "cache": "hot",
              "graph_us": [13.0, 14.0, 99.0],
              "kernel": "cuda:0 paged_sdpa; ..., splits 2 x 32 tokens (tile 64)",
              "fields": timeline.FIELDS, "split": split, "combine": combine}
    rows = tmp_path / "rows.jsonl.gz"
    with gzip.open(rows, "wt") as f:
        f.write(json.dumps(record) + "\n")
    assert timeline.main(["--from-rows", str(rows)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("native:cuda 64/1 hot (cuda:0 paged_sdpa; ..., splits 2 x 32 tokens")
    assert "graph timer 14.00 µs/op" in text  # the median of the replays
    # the two blocks are one unit's two splits: balanced, both end at their mean
    assert "balanced in each unit / in the grid   10.30 / 10.30" in text
    assert "the SMs' mean ends spread over 0.60 µs" in text


def test_the_timeline_summary_refuses_a_table_with_no_split_block() -> None:
    with pytest.raises(ValueError, match="no split block stamped"):
        load("timeline").summarize([], [])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_the_timeline_build_stamps_the_register_load_and_cp_async_split_kernels_and_the_combine(
        tmp_path: Path) -> None:
    # -DKVMICRO_TIMELINE=ON (scripts/timeline.py); the default build's KV_STAMP is empty.
    import re
    import subprocess

    ptx = tmp_path / "paged_sdpa.ptx"
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-I", str(ROOT / "csrc"),
                    "-DKVMICRO_WITH_CUDA=1", "-DKVMICRO_TIMELINE=1", "-arch=sm_90", "-ptx",
                    str(ROOT / "csrc" / "cuda" / "paged_sdpa.cu"), "-o", str(ptx)], check=True)
    text = ptx.read_text()
    bodies = dict(re.findall(r"\.entry (\S+)\((.*?)\n}\n", text, flags=re.S))
    stamped = {kind: [name for name in bodies if kind in name]
               for kind in ("split_async", "split_mma", "combine")}
    for kind, names in stamped.items():
        assert names, kind
        for name in names:
            assert bodies[name].count("%globaltimer") >= 5, name


# ---- scripts/device_common.sh: the device scripts' shared steps ----------------------------------


def _bash(script: str, cwd: Path, path_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path_dir is not None:
        env["PATH"] = f"{path_dir}:{env['PATH']}"
    return subprocess.run(["bash", "-c", f"source {ROOT}/scripts/device_common.sh; {script}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


def test_gpu_facts_queries_nvidia_smi_for_one_line_with_the_extra_fields(tmp_path: Path) -> None:
    stub = tmp_path / "nvidia-smi"
    stub.write_text('#!/usr/bin/env bash\necho "$@"\n')
    stub.chmod(0o755)
    plain = _bash("gpu_facts", tmp_path, tmp_path).stdout.strip()
    assert plain == ("--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,"
                     "pstate --format=csv,noheader")
    extra = _bash("gpu_facts clocks.mem,power.draw", tmp_path, tmp_path).stdout.strip()
    assert extra.startswith("--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                            "power.draw,temperature.gpu,pstate ")


def test_build_native_builds_cuda_for_sm_90_and_stops_the_script_when_the_build_fails(
        tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    build = tmp_path / "scripts" / "dev-build.sh"
    build.write_text('#!/usr/bin/env bash\necho "KVMICRO_CUDA=$KVMICRO_CUDA $*"\n'
                     'for i in $(seq 40); do echo "line $i"; done\nexit "${FAIL:-0}"\n')
    build.chmod(0o755)
    ok = _bash("build_native DIR build.log -DKVMICRO_TIMELINE=ON; echo after", tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "after"  # the build's output is in the log
    log = (tmp_path / "build.log").read_text()
    assert log.startswith("KVMICRO_CUDA=ON DIR -DCMAKE_CUDA_ARCHITECTURES=90 -DKVMICRO_TIMELINE=ON")
    failed = _bash("FAIL=2 build_native DIR build.log; echo after", tmp_path)
    assert failed.returncode == 1 and "after" not in failed.stdout
    lines = failed.stdout.strip().splitlines()
    assert lines[-1] == "BUILD FAILED" and lines[-2] == "line 40" and len(lines) == 31
