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
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from edgefleet.common.defaults import EMBEDDED_BROKER_HOST, EMBEDDED_BROKER_PORT

from . import broker_acl
from .errors import Unavailable

log = logging.getLogger(__name__)

PasswordCheck = Callable[[str | None, str | None], bool]
START_TIMEOUT_S = 10.0


class DeviceTopicPlugin(BaseTopicPlugin):
    """amqtt topic plugin: each login publishes and subscribes only what ``broker_acl`` allows it.

    amqtt answers a refused SUBSCRIBE with return code 0x80 and drops a refused PUBLISH
    (still acknowledged at QoS 1); the client stays connected either way."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        username = session.username if session is not None else None
        if action is Action.PUBLISH:
            allowed = topic is not None and broker_acl.may_publish(username, topic)
        elif action is Action.SUBSCRIBE:
            allowed = topic is not None and broker_acl.may_subscribe(username, topic)
        else:
            return True  # RECEIVE: what a login may subscribe to, it may receive
        if not allowed:
            log.warning("MQTT %s of %r refused for %r", action.value if action else "?", topic, username)
        return allowed


class _Broker(Broker):
    """amqtt 0.12.1's Broker, fixed where devices share it.

    - A CONNECT is authenticated and authorized before amqtt touches the session its client id
      names: amqtt itself dropped that session's subscriptions (clean session) or took it over
      before checking the password, so anyone could cut the controller off.
    - Retained messages are replayed only for the connecting session's own filters: on connect
      amqtt replayed those matching any client's filters (an agent adopted another device's
      desired state).
    """

    def __init__(self, config: dict[str, Any], check: PasswordCheck | None) -> None:
        super().__init__(config, loop=asyncio.get_running_loop())
        self._check = check

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            try:
                handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
            except MQTTError:
                await writer.close()
                raise
            refusal = await self._refusal(session)
            if refusal is not None:
                log.warning("MQTT client %r from %s refused: %s", session.client_id, remote_address, refusal)
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
                raise MQTTError(refusal)
        except OSError as e:
            # The client left while its CONNECT was answered or closed (a reset, a port probe). amqtt
            # catches only its own errors here: an OSError reached asyncio, which logged a traceback
            # per connection. As an MQTTError it is one line, and amqtt releases the connection slot.
            raise MQTTError(f"client {remote_address}:{remote_port} left during CONNECT: {e}") from None
        # From here on as amqtt's own _initialize_client_session (0.12.1).
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        return handler, session

    async def _refusal(self, session: Session) -> str | None:
        if self._check is None:
            return None  # an open broker (tests): anyone, anything
        try:
            # The check reads the database: off the broker's event loop.
            ok = await asyncio.to_thread(self._check, session.username, session.password)
        except Exception:  # a failing check must refuse, not crash the broker
            log.exception("MQTT password check failed for user %r", session.username)
            ok = False
        if not ok:
            return f"user {session.username!r}: unknown user or wrong password"
        will = session.will_topic if session.will_flag else None
        return broker_acl.connect_refusal(session.username, session.client_id, will)

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        return True  # _refusal() admitted this session before amqtt created it

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if any(s.client_id == session.client_id for s, _qos in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def disconnect(self, client_id: str) -> bool:
        """Close the client's connection (its will is sent) and forget its session; False if unknown."""
        _session, handler = self._sessions.get(client_id, (None, None))
        if handler is not None and handler.writer is not None:
            await handler.writer.close()
        known = client_id in self._sessions
        await self._delete_session(client_id)
        return known


class EmbeddedBroker:
    """``start()`` listens on host:port (raises Unavailable if it cannot); ``stop()`` closes it.

    With ``check_password`` only logins it accepts connect, and each is held to ``broker_acl``;
    without it the broker is open (tests). ``revoke(device_id)`` is its ``BrokerAdmin``.
    """

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
        self._broker: _Broker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only the ACL: the default logging and $SYS plugins cost CPU on every packet.
            "plugins": {f"{__name__}.DeviceTopicPlugin": {}} if self._check else {},
        }

    async def _start(self) -> None:
        self._broker = _Broker(self._config(), self._check)
        await self._broker.start()

    def disconnect(self, client_id: str) -> bool:
        """Close the client's open connection now and forget its session; False if it had none."""
        if self._loop is None or self._broker is None:
            return False
        try:
            closing = asyncio.run_coroutine_threadsafe(self._broker.disconnect(client_id), self._loop)
            return closing.result(START_TIMEOUT_S)
        except Exception as e:  # the broker's own failure, whatever it is
            raise Unavailable(f"the embedded MQTT broker did not close {client_id}'s session ({e!r}); "
                              "restart the controller to close it") from e

    def admit(self, device_id: str) -> None:
        """BrokerAdmin: nothing to do, logins are checked against the database."""

    def revoke(self, device_id: str) -> None:
        """BrokerAdmin: close the device's open session (its credentials go from the database)."""
        if self.disconnect(device_id):
            log.info("closed the MQTT session of removed device %s", device_id)

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
