"""Benchmark 9, what the secured control plane costs, in one run.

- handshake: MQTT 5 connect until CONNACK, over plain TCP to an open Mosquitto and over TLS,
  with a client certificate from the fleet CA, to the Mosquitto of `fleetctl broker config
  mosquitto` (dynamic security): the same mosquitto binary, both started by this run;
- signature: signing and checking one desired state (benchmark 7's steps);
- ingest: benchmark 2's bare paho subscriber and Bridge + Ingest into PostgreSQL, on the open
  broker and on the secured one (every simulated device with a certificate of its own).

    python -m bench.security --devices 20 --seconds 15 --connects 200
"""
from __future__ import annotations

import argparse
import getpass
import ssl
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench import director as director_bench
from bench import ingest
from bench._common import table
from bench.fanout import _connectable, mosquitto, process, wait_for
from bench.ports import free_port
from edgefleet.controller.home import init_home
from edgefleet.controller.mosquitto_config import MosquittoOptions, write_mosquitto
from edgefleet.controller.pki import FleetCA, replica_identity

BARE, BRIDGE = "bench-bare", "bench-bridge"  # controller replicas: one identity each
PLAIN, SECURED = "plain TCP, anonymous", "TLS, client certificate, dynamic security"


def connect_ms(port: int, context: ssl.SSLContext | None, repeat: int) -> float:
    """Median milliseconds from connect() to the CONNACK, each on a new connection."""
    times = []
    for i in range(repeat):
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"hs-{i}", protocol=paho.MQTTv5)
        if context is not None:
            client.tls_set_context(context)
        acked = threading.Event()
        client.on_connect = lambda *_args, acked=acked: acked.set()
        start = time.perf_counter()
        client.connect("127.0.0.1", port)
        while not acked.is_set():
            client.loop(0.01)
        times.append(time.perf_counter() - start)
        client.disconnect()
    return statistics.median(times) * 1e3


def secured_broker(work: Path, port: int, devices: list[str]) -> ingest.Tls:
    """`fleetctl broker config mosquitto` for a fresh fleet home, devices admitted, a certificate each."""
    config = init_home(work / "home")
    write_mosquitto(config, MosquittoOptions(output=work / "broker", hosts=("127.0.0.1",), port=port,
                                             bind="127.0.0.1", user=getpass.getuser(), devices=devices,
                                             replicas=(BARE, BRIDGE)))
    ca, certs = FleetCA.load(config.home), work / "certs"
    certs.mkdir()
    for name in [*devices, BARE, BRIDGE]:
        identity = name if name in devices else replica_identity(name)
        key, issued = ca.issue_with_key(identity, 86400)
        (certs / f"{name}.pem").write_text(issued.pem)
        (certs / f"{name}-key.pem").write_bytes(key)
    return ingest.Tls(ca=str(config.home / "ca" / "ca.pem"), certs=str(certs), bare=BARE, bridge=BRIDGE,
                      share_group=config.effective_share_group)


@dataclass(frozen=True)
class IngestRow:
    broker: str         # "open" or "secured"
    bare_rate: float    # msgs/s of a bare paho subscriber
    rate: float         # msgs/s of Bridge + Ingest into PostgreSQL
    lost: int


@dataclass(frozen=True)
class SecurityCost:
    connects: int
    handshake_ms: list[tuple[str, float]]  # (broker, median ms), plain first
    signature: director_bench.Measured
    repeat: int
    devices: int
    seconds: float
    ingest: list[IngestRow]                # open first


def measure(args: argparse.Namespace) -> SecurityCost:
    with tempfile.TemporaryDirectory(prefix="bench-security-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        plain_port, tls_port = free_port(), free_port()
        devices = ingest.device_names(args.devices)
        tls = secured_broker(work, tls_port, devices)
        (work / "plain").mkdir()
        stack.enter_context(process(mosquitto(work / "plain", plain_port), work / "plain.log"))
        program = mosquitto(work / "plain", plain_port)
        stack.enter_context(process(program, work / "plain.log"))
        stack.enter_context(process([program[0], "-c", str(work / "broker" / "mosquitto.conf")], work / "tls.log"))
        for port in (plain_port, tls_port):
            wait_for(f"mosquitto on {port}", partial(_connectable, port), 20)
        handshake = [(PLAIN, connect_ms(plain_port, None, args.connects)),
                     (SECURED, connect_ms(tls_port, tls.context(devices[0]), args.connects))]
        signature = director_bench.measure(args.repeat)
        rows = []
        for label, url, secured in (("open", f"mqtt://127.0.0.1:{plain_port}", None),
                                    ("secured", f"mqtts://127.0.0.1:{tls_port}", tls)):
            _published, _received, bare_rate = ingest.bare_phase(url, devices, args.seconds, secured)
            published, stored, rate = ingest.bridge_phase("postgresql", url, args.postgres, devices, args.seconds,
                                                          work, secured)
            rows.append(IngestRow(label, bare_rate, rate, published - stored))
    return SecurityCost(args.connects, handshake, signature, args.repeat, args.devices, args.seconds, rows)


def render(cost: SecurityCost) -> str:
    base = cost.handshake_ms[0][1]
    open_rate = cost.ingest[0].rate
    return "\n".join([
        f"### MQTT connect until CONNACK (median of {cost.connects})\n",
        table(["broker", "median ms", "vs plain"],
              [(n, f"{ms:.2f}", f"{ms / base:.1f}") for n, ms in cost.handshake_ms]),
        f"\n### Signed desired states (median of {cost.repeat}; ed25519, DSSE envelope)\n",
        table(["step", "where", "median µs"], [(s, w, f"{us:.0f}") for s, w, us in cost.signature.steps]),
        f"\n### Telemetry ingest into PostgreSQL, {cost.devices} devices, {cost.seconds:g} s per phase\n",
        table(["broker", "bare paho msgs/s", "bridge+ingest msgs/s", "ratio to bare", "vs open", "lost"],
              [(r.broker, f"{r.bare_rate:,.0f}", f"{r.rate:,.0f}", f"{r.rate / r.bare_rate:.2f}",
                f"{r.rate / open_rate:.2f}", r.lost) for r in cost.ingest]),
    ])


def main(argv: list[str] | None = None) -> SecurityCost:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each ingest phase")
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1000, help="desired states signed and checked")
    parser.add_argument("--postgres", default=ingest.DEFAULT_POSTGRES, help="server URL without a database name")
    cost = measure(parser.parse_args(argv))
    print(render(cost))
    return cost


if __name__ == "__main__":
    main()
