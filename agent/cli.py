"""``fleet-agent``: the device agent's command line, a thin layer over the library.

Examples::

    fleet-agent enroll --controller http://controller:8470 --token T
    fleet-agent run --config /var/lib/edgefleet-agent/agent.toml
    fleet-agent status
    fleet-agent rollback
    fleet-agent serve digits.onnx --http 127.0.0.1:8471
    fleet-agent bench digits.onnx

Errors print one line on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

from edgefleet.common import logs
from edgefleet.common.defaults import DEFAULT_STATE_DIR
from edgefleet.common.errors import EdgefleetError
from edgefleet.common.settings import environment_help

from .config import ENV_PREFIX, AgentConfig
from .slots import Slots, installed_models, model_dir
from .version import agent_version

CONFIG_ENV = "FLEET_AGENT_CONFIG"
ROLLBACK_WAIT_S = 10.0  # a running agent flips its slots between reconcile steps


def default_config() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_STATE_DIR / "agent.toml")


class CliError(Exception):
    """A user-facing failure: one line, exit 1."""


def _load_config(path: Path) -> AgentConfig:
    if not path.exists():
        raise CliError(f"no agent config at {path}: run `fleet-agent enroll` first or pass --config")
    try:
        return AgentConfig.load(path)
    except ValueError as e:
        raise CliError(str(e)) from None


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help=f"agent config (default: ${CONFIG_ENV} or {DEFAULT_STATE_DIR}/agent.toml)")


# --- commands ------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Agent

    faulthandler.enable()  # a crash inside ONNX Runtime leaves a Python traceback in the journal
    logs.setup(args.log_level, args.log_format)
    return Agent(_load_config(args.config or default_config())).run()


def cmd_enroll(args: argparse.Namespace) -> int:
    from .daemon import hardware_profile
    from .enroll import enroll

    state_dir = args.state_dir or DEFAULT_STATE_DIR
    profile = hardware_profile(AgentConfig(state_dir=state_dir))
    result = enroll(args.controller, args.token, state_dir, profile)
    print(f"enrolled as {result.config.device_id}; config written to {result.config_path}")
    return 0


def _installed(config: AgentConfig) -> dict[str, Slots]:
    """Each installed model's slots; a state directory an agent of one model left is read in place."""
    state_dir = Path(config.state_dir)
    found = {model: Slots(model_dir(state_dir, model)) for model in installed_models(state_dir)}
    single = Slots(state_dir)
    active, journal = single.active(), single.journal()
    name = active.meta.ref.model if active else (journal.desired.model if journal else None)
    if not found and name:
        found[name] = single
    return found


def _status(config: AgentConfig) -> dict:
    models = {}
    for model, slots in _installed(config).items():
        active, previous, journal = slots.active(), slots.previous(), slots.journal()
        models[model] = {
            "active": active.meta.ref.to_dict() if active else None,
            "previous": previous.meta.ref.to_dict() if previous else None,
            "update": None if journal is None else {
                "generation": journal.generation,
                "state": journal.state.reported.value,
                "version": journal.desired.version,
                "detail": journal.detail,
            },
        }
    return {"device": config.device_id, "models": models}


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(_status(_load_config(args.config or default_config())), indent=2))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from .daemon import signal_running_agent

    config = _load_config(args.config or default_config())
    installed = _installed(config)
    if args.model is None and len(installed) > 1:
        raise CliError(f"this device serves {', '.join(sorted(installed))}: name one with --model")
    model = args.model or next(iter(installed), "")
    slots = installed.get(model)
    if slots is None:
        raise CliError(f"model {model!r} is not installed" if model else "no model is installed")
    before = slots.pointer()
    if slots.previous() is None:
        raise CliError(f"no previous version of {model} is installed to roll back to")
    if not signal_running_agent(config.state_dir, model):
        pointer = slots.rollback()
        _keep_owner(config.state_dir, slots.root / "pointer.json")
        print(f"active model is now {pointer.active} (served when the agent starts)")
        return 0
    deadline = time.monotonic() + ROLLBACK_WAIT_S
    while time.monotonic() < deadline:
        if slots.pointer().active != before.active:
            print(f"active model is now {slots.pointer().active}")
            return 0
        time.sleep(0.1)
    raise CliError(
        f"the agent did not roll back within {ROLLBACK_WAIT_S:.0f}s; see its log (journalctl -u fleet-agent)"
    )


def _keep_owner(state_dir: Path, path: Path) -> None:
    """Run as root on a stopped service's state: hand the file back to the agent's user."""
    owner = os.stat(state_dir)
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(path, owner.st_uid, owner.st_gid)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve_command

    return serve_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    def active_model() -> Path:
        installed = _installed(_load_config(args.config or default_config()))
        if len(installed) > 1:
            raise CliError(f"this device serves {', '.join(sorted(installed))}: pass the MODEL.onnx to benchmark")
        active = next(iter(installed.values())).active() if installed else None
        if active is None:
            raise CliError("no model is installed yet; pass a MODEL.onnx to benchmark")
        return active.model

    return bench_command(args, default_model=active_model)


def build_parser() -> argparse.ArgumentParser:
    from . import bench, serve

    parser = argparse.ArgumentParser(prog="fleet-agent", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fleet-agent {agent_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent daemon", formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=environment_help(AgentConfig, ENV_PREFIX, "agent.toml"))
    _add_config(run)
    run.add_argument("--log-level", default="info", choices=logs.LEVELS)
    run.add_argument("--log-format", default="auto", choices=logs.FORMATS,
                     help="auto (default): journal (<6> priority prefixes) when stderr is journald's, else text")
    run.set_defaults(func=cmd_run)

    enroll = sub.add_parser("enroll", help="enroll this device with a controller")
    enroll.add_argument("--controller", required=True, help="controller URL, e.g. http://controller:8470")
    enroll.add_argument("--token", required=True, help="one-time enrollment token from `fleetctl devices token`")
    enroll.add_argument("--state-dir", type=Path, default=None, help=f"default: {DEFAULT_STATE_DIR}")
    enroll.set_defaults(func=cmd_enroll)

    status = sub.add_parser("status", help="show the active and previous model and the update in progress")
    _add_config(status)
    status.set_defaults(func=cmd_status)

    rollback = sub.add_parser("rollback", help="reactivate the previous version of a model now")
    _add_config(rollback)
    rollback.add_argument("--model", help="the model to roll back (needed when the device serves several)")
    rollback.set_defaults(func=cmd_rollback)

    serve.build_parser(sub.add_parser("serve", help="serve one local ONNX model (no controller)"))
    sub.choices["serve"].set_defaults(func=cmd_serve)

    bench_parser = sub.add_parser("bench", help="benchmark a model (default: the active one)")
    bench.build_parser(bench_parser)
    _add_config(bench_parser)
    bench_parser.set_defaults(func=cmd_bench)

    sub.add_parser("tuf-client", help="TUF conformance client (see `fleet-agent tuf-client -h`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tuf-client"]:
        from . import tufclient

        return tufclient.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, EdgefleetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
