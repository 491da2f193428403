"""The controller's error tree, translated at the boundaries (API -> HTTP status,
CLI -> one line and exit code, bridge -> log and drop)."""


class ControllerError(Exception):
    """Base of every error the controller raises on purpose."""

    http_status = 500


class InvalidInput(ControllerError):
    """The caller sent something malformed or out of range."""

    http_status = 400


class NotFound(ControllerError):
    http_status = 404


class Conflict(ControllerError):
    """The request contradicts current state (duplicate, overlapping rollout, reused token)."""

    http_status = 409


class Unauthorized(ControllerError):
    http_status = 401


class Forbidden(ControllerError):
    """A valid operator token whose role does not allow the call."""

    http_status = 403


class Unavailable(ControllerError):
    """A dependency (database, broker, artifact store) is down; retry later."""

    http_status = 503


class BuildError(InvalidInput):
    """A model bundle could not be built (bad model, bad data, accuracy bound exceeded)."""


class SigningError(ControllerError):
    """The TUF repository could not be read or signed."""
