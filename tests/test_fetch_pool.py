"""HttpFetcher never hands a pooled connection with an unread body to the next request.

Found by the fan-out benchmark: under load a 404's body arrived after the
connection went back to urllib3's pool, and the device's next request read it
as its own status line, again on every retry."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Generator, Iterator

import pytest
from tuf.api import exceptions

from edgefleet.agent.fetch import HttpFetcher

BODY_404 = b'{"error":"not here"}'


ANSWERS = {  # path -> (status line, body sent at once, body sent late in its own segment)
    b"/missing": (b"404 Not Found", b"", BODY_404),
    b"/big": (b"200 OK", b"x" * 10, b"y" * 1000),
    b"/ok": (b"200 OK", b"hello", b""),
}


def _serve(conn: socket.socket) -> None:
    """Keep-alive HTTP/1.1 on one connection; the late part of a body comes after a pause."""
    buffer = b""
    with conn:
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                status, early, late = ANSWERS[head.split(b" ")[1]]
                conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(early + late), early))
                if late:
                    time.sleep(0.3)
                    conn.sendall(late)
        except OSError:  # the client closed the connection: expected after the fix
            return


@pytest.fixture
def server() -> Iterator[str]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    listener.close()


def test_error_answer_body_never_leaks_into_the_next_request(server):
    fetcher = HttpFetcher(timeout_s=5)
    with pytest.raises(exceptions.DownloadHTTPError):
        fetcher.fetch_from(f"{server}/missing", 0)
    assert b"".join(fetcher.fetch_from(f"{server}/ok", 0)[1]) == b"hello"


def test_a_body_read_only_in_part_never_leaks_into_the_next_request(server):
    fetcher = HttpFetcher(timeout_s=5)
    chunks = fetcher.fetch_from(f"{server}/big", 0)[1]
    assert isinstance(chunks, Generator)
    next(chunks)
    chunks.close()  # the reader stops early, as at a length cap
    assert b"".join(fetcher.fetch_from(f"{server}/ok", 0)[1]) == b"hello"
