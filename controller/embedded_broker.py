"""The embedded MQTT 3.1.1 broker (amqtt) for a controller started without a broker URL.

amqtt is asyncio; the controller is threaded, so the broker gets its own thread and
event loop. Sessions and retained messages live in memory only: after a restart the
bridge republishes the desired states from the database (see ``Bridge``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from edgefleet.common.defaults import EMBEDDED_BROKER_HOST, EMBEDDED_BROKER_PORT

from .errors import Unavailable

log = logging.getLogger(__name__)

PasswordCheck = Callable[[str | None, str | None], bool]
START_TIMEOUT_S = 10.0


class CallbackAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin: anonymous allowed unless a ``check(username, password)`` is given."""

    @dataclass
    class Config:
        check: Any = None  # PasswordCheck | None (dacite cannot type-check a Callable)

    async def authenticate(self, *, session: Session) -> bool:
        check = self.config.check
        if check is None:
            return True
        try:
            return bool(check(session.username, session.password))
        except Exception:  # a failing check must refuse, not crash the broker
            log.exception("MQTT password check failed for user %r", session.username)
            return False


class EmbeddedBroker:
    """``start()`` listens on host:port (raises Unavailable if it cannot); ``stop()`` closes it."""

    def __init__(
        self,
        host: str = EMBEDDED_BROKER_HOST,
        port: int = EMBEDDED_BROKER_PORT,
        check_password: PasswordCheck | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._check = check_password
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only auth: the default logging and $SYS plugins cost CPU on every packet.
            "plugins": {f"{__name__}.CallbackAuthPlugin": {"check": self._check}},
        }

    async def _start(self) -> None:
        self._broker = Broker(self._config(), loop=asyncio.get_running_loop())
        await self._broker.start()

    @staticmethod
    async def _shutdown(broker: Broker) -> None:
        # amqtt 0.12's shutdown() hangs cancelling a connected client's reader; closing the
        # connections first lets each end the normal way (wills included), then it returns.
        for _session, handler in list(broker._sessions.values()):
            if handler is not None and handler.writer is not None:
                await handler.writer.close()
        for _ in range(100):
            if all(s.transitions.state != "connected" for s, _h in broker._sessions.values()):
                break
            await asyncio.sleep(0.02)
        await broker.shutdown()

    def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"mqtt-broker-{self.port}", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._start(), loop).result(START_TIMEOUT_S)
        except Exception as e:
            self._close_loop()
            raise Unavailable(
                f"embedded MQTT broker cannot listen on {self.host}:{self.port} ({e}); "
                "free the port or configure broker_url"
            ) from e
        log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(self._broker), self._loop).result(START_TIMEOUT_S)
            except Exception:  # shutting down anyway; the loop is closed below
                log.exception("embedded MQTT broker did not shut down cleanly")
        self._close_loop()
        log.info("embedded MQTT broker on %s stopped", self.url)

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._thread
        assert loop is not None and thread is not None

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_rest(), loop).result(START_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        loop.close()
        self._loop = self._thread = self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
