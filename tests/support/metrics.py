"""Scrape a real ``/metrics`` endpoint over HTTP and index its samples for asserts."""
from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# the sample names a family of each type exposes, besides its own name
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


@dataclass(frozen=True)
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    names: frozenset[str]  # every sample name a declared family can expose (those without samples too)

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` with exactly ``labels`` (0 when absent: a series not yet seen)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str, token: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    return Scrape(
        samples={(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples},
        names=frozenset(f.name + suffix for f in families for suffix in ("", *_SUFFIXES.get(f.type, ())))
    )
