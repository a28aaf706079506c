"""Shared test fixtures: the vendored upstream checkpoints, tiny real models, and the CI skip rule.

Under CI=true a skipped test is a failure: CI installs everything the suite needs (Chromium,
PostgreSQL), so a skip there means a part silently went untested. Elsewhere skips are summed up in one
line by reason (pyproject's `-rfE` lists only failures and errors), not one line per skipped test.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = Path(__file__).resolve().parent / "fixtures" / "upstream"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def skip_reason(report) -> str:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    """One line for every skip outside CI: '53 skipped: 45 × needs PostgreSQL ..., 8 × browser test needs ...'."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if skipped and not IN_CI:
        counts = Counter(skip_reason(r) for r in skipped)
        parts = "; ".join(f"{n} × {reason}" for reason, n in counts.most_common())
        terminalreporter.write_line(f"{len(skipped)} skipped: {parts}", yellow=True)


@pytest.fixture(scope="session")
def upstream_dir():
    """Read-only path to the vendored upstream fixtures (classic/ and current/)."""
    return UPSTREAM


@pytest.fixture
def upstream_copy(tmp_path):
    """A writable copy of one upstream generation's base dir: upstream_copy("current")."""
    def make(generation: str) -> Path:
        dst = tmp_path / f"upstream_{generation}"
        shutil.copytree(UPSTREAM / generation, dst)
        for p in dst.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        return dst
    return make

# Registry fixtures (store, store_url) for every test module; see tests/registry_kit.py.
pytest_plugins = ["tests.registry_kit"]


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """The demo base dir (scripts/demo.py, profile "test"), built once per session: shards, tokenizer,
    three tiny real runs (one SIGKILLed and resumed: two segments) and registry.sqlite. Read-only:
    copy it before changing anything."""
    from scripts.demo import build_demo

    base = tmp_path_factory.mktemp("demo_base")
    build_demo(base, profile="test")
    return base
