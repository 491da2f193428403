"""``fleetctl controller run``: the controller's parts wired into one process.

Start order: database schema check, artifact store (must hold the TUF root),
embedded MQTT broker (only without broker_url), MQTT bridge, scheduler, then the
HTTP API in the main thread. SIGTERM/SIGINT stop the API and then every part in
reverse order. Under systemd (NOTIFY_SOCKET) READY=1 is sent once the API
listens, and WATCHDOG=1 at half the watchdog interval while it does.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from functools import partial

import uvicorn

from edgefleet.common.systemd import sd_notify, watchdog_interval

from .api.app import create_app
from .api.deps import ApiContext
from .api.enroll import ROOT_KEY
from .broker import Bridge, BridgeOptions
from .broker_acl import CONTROLLER_USER, reserved_client_id
from .broker_admin import BrokerAdmin, NoBrokerAdmin
from .config import ControllerConfig
from .db.models import Device
from .db.session import Database
from .director import DirectorSigner
from .embedded_broker import EmbeddedBroker
from .errors import ControllerError, Unavailable
from .ingest import Ingest
from .jobs import add_housekeeping
from .mirror import mirror_targets
from .mosquitto_admin import MosquittoAdmin
from .rollout import engine, reread
from .scheduler import Scheduler
from .signing import Expiry, Repository
from .store import ArtifactStore, open_store
from .tokens import read_operator_token, register_operator_token, verify_mqtt_password

log = logging.getLogger(__name__)

RESIGN_INTERVAL_S = 300.0
MIRROR_INTERVAL_S = 30.0  # a publish also asks for a mirror pass through the API


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its own graceful stop, which would kill the
    process before the broker, bridge and scheduler stop; here a signal only ends serving."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._stop_serving) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_serving(self, sig: int, frame: object) -> None:
        log.info("%s: stopping", signal.Signals(sig).name)
        self.force_exit = self.should_exit  # a second signal skips waiting for open connections
        self.should_exit = True


class ControllerService:
    def __init__(self, config: ControllerConfig):
        self.config = config
        self.db = Database(config.effective_database_url)
        self.store: ArtifactStore | None = None
        self.broker: EmbeddedBroker | None = None
        self.bridge: Bridge | None = None
        self.broker_admin: BrokerAdmin = NoBrokerAdmin()
        self.scheduler: Scheduler | None = None
        self.repository: Repository | None = None
        self.server: _Server | None = None
        self._bridge_password = secrets.token_urlsafe(32)
        self._stopped = threading.Event()

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start every part but the API; a part that cannot start raises one ControllerError line."""
        self.db.check_schema()
        self.store = open_store(self.config)
        if not self.store.exists(ROOT_KEY):
            raise Unavailable(f"the artifact store has no {ROOT_KEY}: run `fleetctl init` with this config.toml")
        self._register_operator_token()
        self.repository = Repository(self.config.home, self.store, Expiry.from_config(self.config))
        mirror_targets(self.db, self.repository)
        director = DirectorSigner(self.repository)  # refuses to start without a director key
        options = BridgeOptions.from_config(self.config)
        if self.config.embedded_broker:
            self.broker = EmbeddedBroker(port=self.config.embedded_broker_port, check_password=self._mqtt_login_ok)
            self.broker.start()
            self.broker_admin = self.broker  # it reads credentials from the database, and closes sessions
            # amqtt speaks MQTT 3.1.1 only: skip the bridge's MQTT 5 probe.
            options = replace(options, url=f"{self.broker.url}?protocol=3.1.1", username=CONTROLLER_USER,
                              password=self._bridge_password, client_id=reserved_client_id(socket.gethostname()))
        self.bridge = Bridge(options, Ingest(self.db), director.seal)
        if self.config.broker_admin == "mosquitto":
            self.broker_admin = MosquittoAdmin(self.bridge)
        self.bridge.start()  # connects in the background and keeps retrying
        self.scheduler = self._schedule()
        self.scheduler.start()

    def _schedule(self) -> Scheduler:
        config = self.config
        # host and process id: an operator (or a test) sees which replica leads
        scheduler = Scheduler(self.db, config,
                              holder_id=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        assert self.repository is not None and self.store is not None and self.bridge is not None
        scheduler.add_job("resign-metadata", partial(self.repository.resign_if_expiring, config.resign_margin_s),
                          RESIGN_INTERVAL_S)
        scheduler.add_job("mirror-targets", partial(mirror_targets, self.db, self.repository), MIRROR_INTERVAL_S)
        scheduler.add_job("rollout-stepping", partial(engine.step_all, self.db, self.bridge),
                          config.scheduler_interval_s)
        scheduler.add_job("reread-reports", reread.ReportSweep(self.db, self.bridge, config.report_reread_s),
                          config.report_reread_s / 2)
        add_housekeeping(scheduler, self.db, config)
        return scheduler

    def serve(self) -> None:
        """Serve the API in this thread until SIGTERM/SIGINT (or ``stop_serving``)."""
        assert self.store is not None, "start() first"
        app = create_app(ApiContext(config=self.config, db=self.db, store=self.store,
                                    broker_admin=self.broker_admin, bridge=self.bridge))
        self.server = _Server(uvicorn.Config(
            app, host=self.config.api_host, port=self.config.api_port, lifespan="off",
            # uvicorn logs through the root logger (its format, its level): log_config=None keeps
            # it from installing its own handlers and format
            log_config=None, log_level=logging.getLogger().getEffectiveLevel(), access_log=False,
            timeout_graceful_shutdown=10,
        ))
        notifier = threading.Thread(target=self._notify_systemd, name="sd-notify", daemon=True)
        notifier.start()
        try:
            self.server.run()
        except SystemExit as e:  # uvicorn exits when it cannot bind; it logged the reason
            raise Unavailable(
                f"the API cannot listen on {self.config.api_host}:{self.config.api_port}: "
                "free the port or set api_port in config.toml"
            ) from e

    def stop(self) -> None:
        """Stop every part that started, in reverse order (safe to call more than once)."""
        self._stopped.set()
        sd_notify("STOPPING=1")
        for name, stop in (("scheduler", self.scheduler and self.scheduler.shutdown),
                           ("bridge", self.bridge and self.bridge.stop),
                           ("broker", self.broker and self.broker.stop)):
            if not stop:
                continue
            try:
                stop()
            except Exception:  # keep stopping the other parts
                log.exception("%s did not stop cleanly", name)
        self.scheduler = self.bridge = self.broker = None
        self.db.dispose()

    def run(self) -> None:
        try:
            self.start()
            self.serve()
        finally:
            self.stop()

    # --- helpers -----------------------------------------------------------------------

    def _register_operator_token(self) -> None:
        token = read_operator_token(self.config.home)
        if token is None:
            log.warning("no operator token in %s: run `fleetctl init` to create one", self.config.home)
            return
        with self.db.unit_of_work() as session:
            if register_operator_token(session, token, "admin"):
                log.info("registered the operator token of %s in the database", self.config.home)

    def _mqtt_login_ok(self, username: str | None, password: str | None) -> bool:
        """Embedded broker logins: this controller's bridge, or an enrolled device with its MQTT password."""
        if not username or not password:
            return False
        if username == CONTROLLER_USER:
            return hmac.compare_digest(password.encode(), self._bridge_password.encode())
        try:
            with self.db.unit_of_work() as session:
                device = session.get(Device, username)
                stored = device.mqtt_password_hash if device is not None else None
        except ControllerError as e:
            log.warning("MQTT login of %r refused: %s", username, e)
            return False
        return stored is not None and verify_mqtt_password(password, stored)

    def _notify_systemd(self) -> None:
        server = self.server
        assert server is not None
        while not server.started:
            if server.should_exit or self._stopped.wait(0.05):
                return
        sd_notify(f"READY=1\nSTATUS=serving on {self.config.api_host}:{self.config.api_port}")
        interval = watchdog_interval()
        while interval and not self._stopped.wait(interval):
            if server.should_exit:
                return
            sd_notify("WATCHDOG=1")
