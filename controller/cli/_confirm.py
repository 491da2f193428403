"""Destructive commands ask first: ``-y/--yes`` answers for scripts."""
from __future__ import annotations

import click

from ..errors import ControllerError

yes_option = click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")


class NotConfirmed(ControllerError):
    """The operator said no, or no one could be asked (stdin closed)."""


def confirm(question: str, yes: bool) -> None:
    """Ask ``question`` on the terminal unless ``--yes`` was given; NotConfirmed unless answered yes."""
    if yes:
        return
    try:
        answered = click.confirm(question, default=False)
    except click.Abort:  # stdin closed (a script without --yes) or Ctrl-C
        answered = False
        click.echo("", err=True)
    if not answered:
        raise NotConfirmed("not confirmed: nothing was changed (pass --yes to skip the question)")
