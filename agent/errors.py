"""The agent's error tree: two roots, as in python-tuf's ngclient.

``RemoteError``: what the controller or repository sent is bad (terminal for
that update). ``TransportError``: the way there failed (retry later).
Foreign exceptions are wrapped at the boundary with ``raise ... from e``.
Shared errors (``StorageError``, ``ProtocolError``) live in ``edgefleet.common.errors``.
"""
from edgefleet.common.errors import EdgefleetError


class AgentError(EdgefleetError):
    """Base of every error the agent raises on purpose."""


class RemoteError(AgentError):
    """The remote side sent something we must not use."""


class VerificationError(RemoteError):
    """Metadata or a target failed TUF verification (signature, hash, length, expiry, rollback)."""


class UnknownTargetError(RemoteError):
    """The desired model/version/variant is not signed by the repository."""


class RejectedError(RemoteError):
    """This device cannot run the variant (hardware requirements unmet)."""


class ModelError(RemoteError):
    """The model file does not load or does not run."""


class GateError(RemoteError):
    """The model loaded but failed its golden set or benchmark gate."""


class TransportError(AgentError):
    """A download or connection failed or stalled; the same step may succeed later."""


class RequestError(AgentError):
    """An inference request is malformed (shape, dtype, size); answered with a 4xx."""


class CommandRefused(RemoteError):
    """A desired state the agent does not obey: unsigned, mis-addressed, replayed or older.

    ``generation`` and ``deployment`` are those the director signed for this device,
    else 0 and None (not attributable).
    """

    def __init__(self, reason: str, generation: int = 0, deployment: str | None = None) -> None:
        super().__init__(reason)
        self.generation = generation
        self.deployment = deployment


class NotSigned(CommandRefused):
    """No threshold of the director keys the agent knows signed it (a TUF refresh may know newer keys)."""
