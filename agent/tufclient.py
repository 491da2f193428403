"""The TUF conformance client-under-test CLI (tuf-conformance's CLIENT-CLI.md).

    --metadata-dir D init ROOT_JSON
    --metadata-url U --metadata-dir D refresh
    --metadata-url U --metadata-dir D --target-name P [--target-name P2 ...]
        --target-dir T --target-base-url B download

Options stand before the command word. Metadata is kept in D under
unversioned names (root.json, timestamp.json, ...); each target is stored in
T under its URL-quoted target path (python-tuf's naming, so a target
downloaded twice keeps one file name), and one that is already there with the
signed length and hashes is not fetched again. Exit 0 on success, 1 on any
failure, with one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

from edgefleet.common.errors import EdgefleetError

from .fetch import ModelUpdater, trust_root


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like every other failure (the protocol knows only 0 and 1)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fleet-agent tuf-client", description="TUF conformance client-under-test (python-tuf ngclient)."
    )
    parser.add_argument("--metadata-dir", type=Path, required=True)
    parser.add_argument("--metadata-url")
    parser.add_argument("--target-name", action="append", default=[])
    parser.add_argument("--target-dir", type=Path)
    parser.add_argument("--target-base-url")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="trust ROOT_JSON; makes no requests")
    init.add_argument("trusted_root", type=Path, metavar="ROOT_JSON")
    commands.add_parser("refresh", help="update top-level metadata from --metadata-url")
    commands.add_parser("download", help="refresh, then download each --target-name in order")
    return parser


def _require(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        parser.error(f"{args.command} needs {', '.join(missing)}")


def _download(args: argparse.Namespace) -> None:
    updater = ModelUpdater(args.metadata_dir, args.metadata_url, args.target_base_url)
    updater.refresh()
    args.target_dir.mkdir(parents=True, exist_ok=True)
    for name in args.target_name:
        target = updater.target(name)
        dest = args.target_dir / quote(target.path, "")
        if updater.find_cached(target, dest):
            continue
        try:
            updater.download(target, dest)
        finally:
            # A one-shot client does not resume: leave only verified files in T.
            dest.with_name(dest.name + ".part").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "init":
            trust_root(args.metadata_dir, args.trusted_root.read_bytes())
        elif args.command == "refresh":
            _require(parser, args, "metadata_url")
            ModelUpdater(args.metadata_dir, args.metadata_url).refresh()
        else:
            _require(parser, args, "metadata_url", "target_name", "target_dir", "target_base_url")
            _download(args)
    except _UsageError as e:
        print(parser.format_usage().rstrip(), file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (EdgefleetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
