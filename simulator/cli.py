"""``python -m edgefleet.simulator``: run a simulated fleet until stopped.

    python -m edgefleet.simulator --controller http://127.0.0.1:8470 --devices 100 --classes x86_64,rpi-4 \\
        --requests-per-s 2 --fault rpi-4:slow-model=40@1.1.0 --status-file /tmp/fleet.json

Every device serves --requests-per-s inference requests on its active model
(inputs: --inputs, else its slot's golden inputs, else generated), samples them
by the policy of its desired state, uploads the samples every --upload-interval
seconds and sends counters telemetry with each heartbeat, as a real agent does.

Prints one JSON line of fleet statistics every ``--status-interval`` seconds
(and writes it to ``--status-file``); SIGTERM or SIGINT stops it cleanly.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from edgefleet.common.fs import atomic_write

from .device import SimDevice
from .faults import Faults
from .fleet import CLASSES, Fleet, FleetConfig
from .traffic import TrafficConfig

# offline: never connects; fail-infer: a fraction of production requests fails (the golden check passes)
FAULT_KINDS = ("fail-golden", "slow-model", "slow-download", "power-cut", "offline", "fail-infer")


def parse_fault(text: str) -> tuple[str, str, str, str]:
    """``TARGET:KIND[=VALUE][@VERSION]`` -> (target, kind, value, version); TARGET is a class or device id."""
    target, sep, rest = text.partition(":")
    rest, _, version = rest.partition("@")
    kind, _, value = rest.partition("=")
    if not sep or not target or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(
            f"fault {text!r} is not TARGET:KIND[=VALUE][@VERSION] with KIND one of {', '.join(FAULT_KINDS)}"
        )
    if kind in ("slow-model", "slow-download", "power-cut", "fail-infer") and not value:
        raise argparse.ArgumentTypeError(f"fault {text!r} needs a value, e.g. slow-model=40 (ms), "
                                         "slow-download=100000 (bytes/s), power-cut=activate (state), "
                                         "fail-infer=0.2 (fraction)")
    if kind == "fail-infer" and not _fraction(value):
        raise argparse.ArgumentTypeError(
            f"fault {text!r}: fail-infer takes a fraction within 0..1, e.g. fail-infer=0.2"
        )
    return target, kind, value, version


def apply_fault(faults: Faults, kind: str, value: str, version: str) -> None:
    if version:
        faults.versions = faults.versions | {version}
    if kind == "fail-golden":
        faults.fail_golden = True
    elif kind == "slow-model":
        faults.extra_latency_ms = float(value)
    elif kind == "slow-download":
        faults.download_bps = float(value)
    elif kind == "power-cut":
        faults.power_cut_at = value
    elif kind == "fail-infer":
        faults.fail_infer = float(value)


def _fraction(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate >= 0 (requests per second per device)")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgefleet.simulator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controller", default="", help="Controller URL: devices enroll through its API.")
    p.add_argument("--token", default="", help="Operator token (default: HOME/operator-token).")
    p.add_argument("--broker", default="", help="Broker URL (default: the one the controller hands out).")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--classes", default="x86_64", help=f"Comma-separated, dealt round-robin: {', '.join(CLASSES)}.")
    p.add_argument("--prefix", default="sim", help="Device ids are PREFIX-CLASS-NNNNN (and label fleet=PREFIX).")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="Label every device.")
    p.add_argument("--state-root", type=Path, help="Devices' state directories (default: a temp dir).")
    p.add_argument("--workers", type=int, default=8, help="Reconcile passes running in parallel.")
    p.add_argument("--first", type=int, default=0, metavar="INDEX",
                   help="Index of the first device (several simulator processes sharing one fleet).")
    p.add_argument("--thin", action="store_true",
                   help="Thin devices: the real MQTT session, TUF download and events, but no ONNX model, golden "
                        "set or benchmark (a fixed benchmark is reported); for measuring the controller.")
    p.add_argument("--bind-address", default="", metavar="ADDR",
                   help="Local address the devices' MQTT connections come from (e.g. 127.0.0.2).")
    p.add_argument("--heartbeat", type=float, default=30.0,
                   help="Seconds between heartbeats (and counters telemetry) of each device.")
    p.add_argument("--requests-per-s", type=_rate, default=2.0, metavar="RATE",
                   help="Inference requests per second per device on its active model (default 2; 0: no traffic, "
                        "no sampling).")
    p.add_argument("--inputs", type=Path, metavar="NPZ",
                   help="Input rows keyed by the model's input names, e.g. the digits eval set "
                        "(default: each slot's golden inputs, else generated to the model's input shapes).")
    p.add_argument("--upload-interval", type=float, default=10.0, metavar="S",
                   help="Seconds between sample uploads of each device (default 10).")
    p.add_argument("--traffic-threads", type=int, default=2, metavar="N",
                   help="Threads running every device's requests and uploads (default 2).")
    p.add_argument("--trusted-root", type=Path, help="Pre-registered devices: root.json they trust.")
    p.add_argument("--metadata-url", default="", help="Pre-registered devices: TUF metadata URL.")
    p.add_argument("--target-base-url", default="", help="Pre-registered devices: TUF targets URL.")
    p.add_argument("--fault", action="append", default=[], type=parse_fault, metavar="TARGET:KIND[=VALUE][@VERSION]",
                   help=f"Inject a fault into a class or one device; KIND: {', '.join(FAULT_KINDS)}.")
    p.add_argument("--status-file", type=Path, help="Keep the latest statistics (JSON) in this file.")
    p.add_argument("--status-interval", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=0.0, help="Stop after this many seconds (0: when signalled).")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> FleetConfig:
    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    token = args.token
    if args.controller and not token:
        from edgefleet.controller.cli.client import read_token
        from edgefleet.controller.config import ControllerConfig

        token = read_token(ControllerConfig.load().home)
    return FleetConfig(
        broker_url=args.broker, devices=args.devices, classes=tuple(c for c in args.classes.split(",") if c),
        prefix=args.prefix, state_root=args.state_root, workers=args.workers, labels=labels,
        first=args.first, thin=args.thin, bind_address=args.bind_address,
        controller_url=args.controller, operator_token=token, heartbeat_s=args.heartbeat,
        trusted_root=args.trusted_root.read_bytes() if args.trusted_root else b"",
        metadata_url=args.metadata_url, target_base_url=args.target_base_url,
        traffic=TrafficConfig(requests_per_s=args.requests_per_s, upload_interval_s=args.upload_interval,
                              inputs=args.inputs, threads=args.traffic_threads),
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.thin and args.fault:
        print("error: thin devices run no model, so they take no --fault; drop --thin or the faults", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fleet = Fleet(config_from(args))
        started = time.monotonic()
        fleet.create()
    except Exception as e:  # noqa: BLE001 - one line for the operator, whatever failed
        print(f"error: cannot set up the fleet: {e}", file=sys.stderr)
        return 1
    offline: list[SimDevice] = []
    for target, kind, value, version in args.fault:
        # faults and --thin are refused together above: every device here is a SimDevice
        matched = [d for d in fleet.devices.values()
                   if isinstance(d, SimDevice) and target in (d.id, d.profile.hardware_class)]
        if not matched:
            print(f"error: fault target {target!r} names no device or class of this fleet", file=sys.stderr)
            return 1
        for device in matched:
            apply_fault(device.faults, kind, value, version)
        if kind == "offline":
            offline += matched
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fleet.start()
    for device in offline:  # enrolled, running, but never reachable
        device.go_offline()
    setup_s = round(time.monotonic() - started, 2)
    print(json.dumps({"event": "started", "devices": len(fleet.devices), "setup_s": setup_s}), flush=True)
    try:
        while not stop.wait(args.status_interval):
            report(fleet, args.status_file)
            if args.duration and time.monotonic() - started >= args.duration:
                break
    finally:
        report(fleet, args.status_file)
        fleet.stop()
        fleet.close()
    return 0


def report(fleet: Fleet, status_file: Path | None) -> None:
    line = json.dumps({"event": "stats", "ts": time.time(), **fleet.stats().to_dict()})
    print(line, flush=True)
    if status_file is not None:
        atomic_write(status_file, line.encode())
