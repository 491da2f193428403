"""bench/verify.py end to end at a tiny size (a smoke test: no timing asserts)."""
from __future__ import annotations

import re

from tests.conftest import need_program
from tests.test_bench_scripts import run


def test_verify_script_prints_the_three_methods():
    need_program("curl", "apt-get install curl")
    out = run("bench.verify", "--size-mb", "1", "--repeat", "1")
    for method in ("TUF download + verify (ModelUpdater)", "sha256sum of the stored file", "curl of the same URL"):
        assert re.search(rf"\| {re.escape(method)} \| \d+\.\d+ \| \d+\.\d \| \d+\.\d\d \|", out), out
    assert "the speed of sha256sum" in out
