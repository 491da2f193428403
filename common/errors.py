"""Errors of the shared contract. Each side's own tree (``agent/errors.py``,
``controller/errors.py``) has these under its root or translates them at its boundary."""


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose, on either side."""


class ProtocolError(EdgefleetError, ValueError):
    """A message, target field or rollout spec that does not follow the wire contract."""


class StorageError(EdgefleetError):
    """The disk could not take a write (full, read-only); nothing was half-written."""


class GoldenFormatError(EdgefleetError):
    """An .npz (golden set or data file) is malformed, oversized or of an unknown format."""
