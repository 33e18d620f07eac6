"""The Metal subset the MSL shim compiles faithfully, as checks over kernel source text.

Each rule guards a trap where g++ would accept a kernel and silently run something else than a
GPU would (tests/test_metal_lint.py applies them to metal/; docs/metal.md lists them):

- threadgroup memory only through host-sized ``threadgroup T* p [[threadgroup(i)]]`` parameters
  (or pointers passed on): a ``threadgroup T a[N];`` declaration becomes a per-thread local
  under the shim, with no error;
- threadgroup pointers to scalar types only (the shim reaches threadgroup memory as volatile);
- no ``static`` storage in functions (one variable shared by every shim thread);
- no ``h`` literal suffix (not C++), no multi-letter swizzles (only .x .y .z .w and [i]);
- no ``std::`` and no includes other than <metal_stdlib> and quoted project headers;
- instantiation only through KV_INSTANTIATE (``[[host_name]]`` lives in kernel_abi.h alone);
- ``bfloat`` only inside ``#if KV_HAS_BFLOAT`` in .metal files (MSL < 3.1 has no bfloat);
- every kernel parameter carries exactly one binding attribute whose buffer slot is a
  BufferIndex of csrc/common/params.h (bindgen.parse_kernels).
"""

from __future__ import annotations

import re

from . import bindgen

_SCALARS = {"float", "int", "uint", "int32_t", "uint32_t"}
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bthreadgroup\s+(?:const\s+)?[\w:<>, ]+?\s+\w+\s*(?:\[|;|=)"),
     "threadgroup storage declared in a body (use a [[threadgroup(i)]] parameter)"),
    (re.compile(r"(?<![\w.])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?h\b"), "`h` literal suffix"),
    (re.compile(r"\.(?:[xyzw]{2,4}|[rgba]{2,4})\b(?!\s*\()"), "swizzle other than .x/.y/.z/.w"),
    (re.compile(r"\bstd::"), "std:: in a kernel"),
    (re.compile(r"\bstatic\s+(?!constexpr|KV_CONST|_assert|inline)"), "static storage"),
    (re.compile(r"#\s*include\s*<(?!metal_stdlib>)"), "include other than <metal_stdlib>"),
    (re.compile(r"\[\[\s*host_name"), "[[host_name]] outside KV_INSTANTIATE"),
]


def check_source(name: str, source: str, *, is_abi: bool = False,
                 indices: dict[str, int] | None = None) -> list[str]:
    """Violations in one file's text, each as ``name:line: what``."""
    problems: list[str] = []
    text = bindgen.strip_comments(source)
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        for pattern, what in _RULES:
            if is_abi and "host_name" in what:
                continue
            if pattern.search(line):
                problems.append(f"{name}:{number}: {what}: {line.strip()}")
        for match in re.finditer(r"\bthreadgroup\s+(?:const\s+)?(\w+)\s*\*", line):
            if match.group(1) not in _SCALARS:
                problems.append(f"{name}:{number}: threadgroup pointer to non-scalar "
                                f"{match.group(1)}: {line.strip()}")
    if name.endswith(".metal"):
        depth_bf = []  # stack of "inside #if KV_HAS_BFLOAT" flags
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith("#if"):
                depth_bf.append("KV_HAS_BFLOAT" in stripped)
            elif stripped.startswith("#endif") and depth_bf:
                depth_bf.pop()
            elif re.search(r"\bbfloat\b", line) and not any(depth_bf):
                problems.append(f"{name}:{number}: bfloat outside #if KV_HAS_BFLOAT: {stripped}")
        try:
            kernels = bindgen.parse_kernels(source, indices)
        except ValueError as err:
            problems.append(f"{name}: {err}")
        else:
            if not kernels:
                problems.append(f"{name}: no kernel")
            if "KV_INSTANTIATE(" not in text:
                problems.append(f"{name}: no instantiation list")
    return problems
