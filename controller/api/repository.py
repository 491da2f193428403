"""``GET /repository/<path>``: the signed TUF repository, public, from the artifact store.

Local stores are streamed with HTTP Range support (resumable downloads); stores
that can presign (S3) answer with a redirect so devices fetch the bytes directly.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ControllerError, NotFound
from ..store import REPOSITORY_PREFIX, ArtifactStore, check_key
from ..store.local import LocalStore
from .deps import get_store

router = APIRouter(tags=["repository"])

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Consistent-snapshot targets are named by their hash: their bytes never change.
_IMMUTABLE = "public, max-age=31536000, immutable"
# Metadata and small models are read whole: streaming costs a thread hop per chunk, and under
# load each hop waits its turn for the interpreter, which made a busy controller slow to serve.
INLINE_MAX = 1 << 20


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a Range header asks for; None to send the whole object.

    Headers this server does not understand (several ranges, other units) are
    ignored as RFC 9110 allows; a well-formed range outside the object raises
    Unsatisfiable.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise Unsatisfiable
    return ByteRange(start, end)


def _headers(path: str) -> dict[str, str]:
    return {"Accept-Ranges": "bytes", "Cache-Control": _IMMUTABLE if path.startswith("targets/") else "no-cache"}


def _media_type(path: str) -> str:
    return "application/json" if path.endswith(".json") else "application/octet-stream"


@router.get("/repository/{path:path}", summary="Download TUF metadata or a target (Range supported)")
def download(path: str, request: Request, store: ArtifactStore = Depends(get_store)) -> Response:
    key = check_key(f"{REPOSITORY_PREFIX}/{path}")
    size = store.size(key)  # NotFound -> 404, Unavailable -> 503 before any redirect
    url = store.download_url(key)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    headers = _headers(path)
    media_type = _media_type(path)
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except Unsatisfiable:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    status = 200 if wanted is None else 206
    wanted = wanted or ByteRange(0, size - 1)
    headers["Content-Length"] = str(wanted.length)
    if status == 206:
        headers["Content-Range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    chunks = store.open_range(key, wanted.start, wanted.end)
    if wanted.length <= INLINE_MAX:
        return Response(b"".join(chunks), status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(chunks, status_code=status, headers=headers, media_type=media_type)


class WholeFiles:
    """ASGI middleware: a plain GET of a whole repository file from a local store, or of a missing
    one, answered before routing, dependencies and the thread pool (a fleet fetching an update asks
    for thousands of them at once, and every TUF refresh probes for a newer root that is not there).
    Anything else (a Range, a large file, an invalid path, another store) goes on to ``download``,
    which answers it in full.
    """

    PREFIX = "/repository/"

    def __init__(self, app: ASGIApp, store: ArtifactStore) -> None:
        self.app = app
        self.store = store if isinstance(store, LocalStore) else None  # other stores' I/O would block the loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self._answer(scope)
        if answer is None:
            await self.app(scope, receive, send)
            return
        status, headers, body = answer
        headers["Content-Length"] = str(len(body))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": body})

    def _answer(self, scope: Scope) -> tuple[int, dict[str, str], bytes] | None:
        """(status, headers, body) for a small file asked for whole, or for a missing one; None to
        let the route answer."""
        if (self.store is None or scope["type"] != "http" or scope["method"] != "GET"
                or not scope["path"].startswith(self.PREFIX)
                or any(name == b"range" for name, _ in scope["headers"])):
            return None
        path = scope["path"][len(self.PREFIX):]
        try:
            key = check_key(f"{REPOSITORY_PREFIX}/{path}")
        except ControllerError:  # not a valid key: the route says so in the API's words
            return None
        try:
            size = self.store.size(key)
            if size > INLINE_MAX:
                return None
            data = b"".join(self.store.open_range(key, 0, size - 1)) if size else b""
        except NotFound as e:  # the 404 the route's error handler gives (api/app.py)
            error = json.dumps({"error": str(e)}, ensure_ascii=False, separators=(",", ":")).encode()
            return 404, {"Content-Type": "application/json"}, error
        except ControllerError:  # e.g. the store is unavailable: the route answers
            return None
        return 200, {**_headers(path), "Content-Type": _media_type(path)}, data
