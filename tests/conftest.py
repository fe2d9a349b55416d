"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Cluster, short_tmpdir

# No /tmp/vestad-NAME.sock links from the suite's many daemons (in this process and every vestad it starts):
# a test's daemon must never be found by another suite running at once. tests/test_first_hour.py turns it on
# for the test of the link itself.
os.environ["VESTA_TMP_LINK"] = "0"


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, short XDG_RUNTIME_DIR so control sockets never collide between tests."""
    path = short_tmpdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    monkeypatch.delenv("VESTA_NAME", raising=False)
    monkeypatch.delenv("VESTA_KEY", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Real vestad processes with their own key and discovery port; all stopped afterwards."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(c.logs())  # noqa: T201 - shown by pytest only for a failing test
        c.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep

