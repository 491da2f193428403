"""One selector thread driving many MQTT connections (paho's external-loop API).

paho normally wants a thread per client (``loop_start``). Here every client's
socket is registered with one ``selectors`` selector: readable sockets get
``loop_read()``, sockets with queued output get ``loop_write()`` (paho tells us
through ``on_socket_register_write``), and ``loop_misc()`` runs for every client
about once a second for keep-alive pings. Connects, reconnects (exponential
backoff with full jitter, as ``MqttConnection`` does) and timers all run on this
thread too, so paho state is only ever driven from here; other threads hand
work over with :meth:`NetworkLoop.call_soon`.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import paho.mqtt.client as paho

from edgefleet.common.mqtt import MqttConnection

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0
CONNECTS_PER_TICK = 100  # a fleet starting at once must not flood the broker's accept queue


class Connection:
    """One ``MqttConnection`` whose network I/O the loop drives; reconnected when its socket closes."""

    def __init__(self, loop: NetworkLoop, conn: MqttConnection) -> None:
        self.loop = loop
        self.conn = conn
        # built at once (the URL names the protocol, so no probe): messages sent before the
        # first connect wait in paho's queue
        self.client: paho.Client = conn.build_client()
        loop.attach(self)
        self.enabled = False      # False: stay disconnected (offline fault, power cut, stop)
        self.attempt = 0
        self._pending = False     # a connect is queued or scheduled

    def start(self) -> None:
        self.loop.call_soon(self._enable)

    def closed(self) -> None:
        """The socket was closed (loop thread): reconnect after a backoff unless told to stay away."""
        if self.conn.connected.is_set():  # still set here: the session was up, start the backoff afresh
            self.attempt = 0
        if self.enabled:
            self._schedule(self.conn.options.backoff.delay(self.attempt))
            self.attempt += 1

    def disconnect(self, abrupt: bool = False, after: Callable[[], None] | None = None) -> None:
        """Leave the broker: DISCONNECT (no will), or ``abrupt``: drop the TCP connection so the will fires."""
        self.loop.call_soon(lambda: self._disconnect(abrupt, after))

    def reconnect(self) -> None:
        self.loop.call_soon(self._enable)

    # --- loop thread -------------------------------------------------------

    def _enable(self) -> None:
        self.enabled = True
        if self.client.socket() is None:
            self._schedule(0.0)

    def _disconnect(self, abrupt: bool, after: Callable[[], None] | None) -> None:
        self.enabled = False
        client = self.client
        sock = client.socket()
        if sock is not None:
            if abrupt:
                try:
                    # paho's TCP transport: a socket.socket (ssl.SSLSocket is one too)
                    cast(socket.socket, sock).shutdown(socket.SHUT_RDWR)  # the next read sees EOF: paho closes it
                except OSError:
                    pass
                self.loop.read_now(client)
            else:
                client.disconnect()
                self.loop.write_now(client)
        if after is not None:
            after()

    def _schedule(self, delay: float) -> None:
        if self._pending:
            return
        self._pending = True
        self.loop.call_later(delay, lambda: self.loop.queue_connect(self))

    def connect_now(self) -> None:
        self._pending = False
        if not self.enabled or self.client.socket() is not None:
            return
        try:
            self.client.reconnect()
        except (OSError, TimeoutError) as e:
            log.info("MQTT connect of %s failed: %s", self.conn.options.client_id, e)
            self.closed()


class NetworkLoop:
    """The shared network thread. Thread-safe entry points: call_soon, call_later, stop."""

    def __init__(self, misc_interval_s: float = MISC_INTERVAL_S, connects_per_tick: int = CONNECTS_PER_TICK) -> None:
        self.misc_interval_s = misc_interval_s
        self.connects_per_tick = connects_per_tick
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_lock = threading.Lock()
        self._counter = itertools.count()
        self._connects: collections.deque[Connection] = collections.deque()
        self._clients: list[paho.Client] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._woken = False

    # --- thread-safe --------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sim-network", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._timer_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._counter), fn))
        self._wake()

    def connection(self, conn: MqttConnection) -> Connection:
        return Connection(self, conn)

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def _wake(self) -> None:
        if self.in_loop or self._woken:
            return
        self._woken = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # --- loop thread ----------------------------------------------------------

    def queue_connect(self, connection: Connection) -> None:
        self._connects.append(connection)

    def attach(self, connection: Connection) -> None:
        """Route a connection's socket events to this loop (any thread, before its first connect)."""
        client = connection.client
        client.user_data_set(connection)
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._written
        self._clients.append(client)

    def read_now(self, client: paho.Client) -> None:
        self._guard(client.loop_read)

    def write_now(self, client: paho.Client) -> None:
        self._guard(client.loop_write)

    def _opened(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._register(sock, selectors.EVENT_READ, client)

    def _closed(self, _client: paho.Client, connection: Connection, sock: Any) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        connection.closed()

    def _want_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        if self.in_loop:
            self._modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        else:  # a publish() from a worker thread
            self.call_soon(lambda: self._modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client))

    def _written(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        if self.in_loop:
            self._modify(sock, selectors.EVENT_READ, client)
        else:
            self.call_soon(lambda: self._modify(sock, selectors.EVENT_READ, client))

    def _register(self, sock: Any, events: int, client: paho.Client) -> None:
        try:
            key = self._selector.get_key(sock.fileno())
        except (KeyError, ValueError):
            key = None
        if key is not None:  # a closed socket's number was reused before its close callback ran
            self._selector.unregister(key.fileobj)
        self._selector.register(sock, events, client)

    def _modify(self, sock: Any, events: int, client: paho.Client) -> None:
        current = client.socket()
        if current is None or current is not sock:
            return  # closed meanwhile
        try:
            self._selector.modify(current, events, client)
        except (KeyError, ValueError):
            pass

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # one client's trouble must not stop the fleet's network
            log.exception("MQTT client I/O failed")

    def _run(self) -> None:
        next_misc = time.monotonic() + self.misc_interval_s
        misc_cursor = 0
        while not self._stop.is_set():
            timeout = min(next_misc - time.monotonic(), self._next_timer() - time.monotonic())
            if self._connects:
                timeout = 0.0
            for key, mask in self._selector.select(max(0.0, min(timeout, self.misc_interval_s))):
                client = key.data
                if client is None:
                    self._drain_wake()
                    continue
                if mask & selectors.EVENT_READ:
                    self._guard(client.loop_read)
                if mask & selectors.EVENT_WRITE and client.socket() is not None:
                    self._guard(client.loop_write)
            self._run_calls()
            self._run_timers()
            for _ in range(min(self.connects_per_tick, len(self._connects))):
                self._guard(self._connects.popleft().connect_now)
            now = time.monotonic()
            if now >= next_misc:
                misc_cursor = self._misc(misc_cursor)
                next_misc = now + self.misc_interval_s / 4

    def _misc(self, cursor: int) -> int:
        """Keep-alive for a quarter of the clients per call: every client about once per interval."""
        count = len(self._clients)
        if not count:
            return 0
        share = max(1, (count + 3) // 4)
        for i in range(share):
            client = self._clients[(cursor + i) % count]
            if client.socket() is not None:
                self._guard(client.loop_misc)
        return (cursor + share) % count

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._woken = False  # after draining: a wake sent meanwhile finds its call still queued

    def _run_calls(self) -> None:
        for _ in range(len(self._calls)):
            self._guard(self._calls.popleft())

    def _next_timer(self) -> float:
        with self._timer_lock:
            return self._timers[0][0] if self._timers else float("inf")

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._timer_lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, fn = heapq.heappop(self._timers)
            self._guard(fn)
