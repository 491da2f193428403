"""``GET /metrics``: Prometheus text for scrapers holding a viewer token (or any higher role).

A Prometheus job sends it as ``authorization: {credentials_file: /etc/prometheus/edgefleet-token}``
(make one with ``fleetctl tokens create prometheus --role viewer``).
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from .. import metrics
from .auth import require_viewer
from .deps import ApiContext, get_ctx

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_viewer)])


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response,
            responses={200: {"content": {metrics.CONTENT_TYPE: {}}}})
def prometheus_metrics(ctx: ApiContext = Depends(get_ctx)) -> Response:
    return Response(metrics.render(metrics.registry(ctx.db, ctx.bridge)), media_type=metrics.CONTENT_TYPE)
