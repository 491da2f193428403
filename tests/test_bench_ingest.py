"""A tiny run of bench/ingest.py: every phase completes and nothing is lost."""
from __future__ import annotations

import pytest

from bench import ingest


@pytest.mark.timeout(200)
def test_ingest_benchmark_smoke(mosquitto_url, postgres_server, capsys):
    results = ingest.main(["--broker", mosquitto_url, "--postgres", postgres_server,
                           "--devices", "2", "--seconds", "1"])
    assert [r.database for r in results] == ["PostgreSQL", "SQLite"]
    for r in results:
        assert r.published > 0 and r.lost == 0 and r.stored == r.published
        assert r.bridge_rate > 0 and r.bare_rate > 0
    assert "| PostgreSQL |" in capsys.readouterr().out
