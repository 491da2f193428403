"""JSON calls to the controller's API (enrollment, certificates): one line per failure."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from .errors import RemoteError, TransportError

MAX_RESPONSE_BYTES = 1024 * 1024
TIMEOUT_S = 30.0


def post_json(url: str, body: dict[str, Any], what: str, token: str = "") -> dict[str, Any]:
    """POST ``body``; the JSON object answered. ``what`` names the call in errors ("enrollment")."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(  # noqa: S310 - the operator's controller URL
        url, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - as above
            data = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code in (408, 429):
            raise TransportError(f"{what} failed (HTTP {e.code}): {_detail(e)}; retry later") from e
        raise RemoteError(f"{what} refused (HTTP {e.code}): {_detail(e)}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TransportError(f"cannot reach the controller at {url}: {reason}; check the controller URL") from e
    if len(data) > MAX_RESPONSE_BYTES:
        raise RemoteError(f"{what} answer from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        answer = json.loads(data)
    except ValueError as e:
        raise RemoteError(f"{what} answer from {url} is not JSON") from e
    if not isinstance(answer, dict):
        raise RemoteError(f"{what} answer from {url} is not a JSON object")
    return answer


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(64 * 1024))
        # the API answers {"error": ...}; FastAPI's own validation errors use "detail"
        detail = (body.get("error") or body.get("detail") or body) if isinstance(body, dict) else body
    except (ValueError, OSError):
        detail = e.reason
    return str(detail).splitlines()[0][:300] if str(detail) else str(e.reason)
