"""benches/: pytest-benchmark suites over kvmicro's sweep cases.

    pytest benches/ --benchmark-only [--kv-backend auto] [--kv-preset quick]

The kvmicro plugin is an entry point of the installed package; from a source tree
(``PYTHONPATH=src``) it is not, so it is loaded here — but only then: registering it twice is an
error. Files named ``bench_*.py`` are collected as test modules.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest


def _plugin_autoloaded() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "kvmicro.pytest_plugin" for ep in entry_points(group="pytest11"))


pytest_plugins = [] if _plugin_autoloaded() else ["kvmicro.pytest_plugin"]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
