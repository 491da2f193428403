"""A tiny run of bench/security.py on two Mosquittos it starts (open, and TLS with dynamic
security): every phase completes, nothing is lost, and RESULTS.md can read its headline back."""
from __future__ import annotations

import pytest

from bench import security
from bench.report import headlines
from tests.conftest import need_program


@pytest.mark.timeout(300)
def test_security_benchmark_smoke(postgres_server, capsys):
    need_program("mosquitto", "apt-get install mosquitto")
    cost = security.main(["--postgres", postgres_server, "--devices", "2", "--seconds", "1",
                          "--connects", "3", "--repeat", "5"])
    assert [name for name, _ms in cost.handshake_ms] == [security.PLAIN, security.SECURED]
    assert all(ms > 0 for _name, ms in cost.handshake_ms)
    assert [r.broker for r in cost.ingest] == ["open", "secured"]
    for row in cost.ingest:
        assert row.lost == 0 and row.rate > 0 and row.bare_rate > 0
    (line,) = headlines("security", capsys.readouterr().out)
    assert line.startswith("Security's cost: MQTT connect") and "0 lost" in line
