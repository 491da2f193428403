"""fleetctl's client of the controller API; every failure becomes one ControllerError line."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import httpx

from ..config import ControllerConfig
from ..errors import (
    Conflict,
    ControllerError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthorized,
    Unavailable,
)
from ..tokens import operator_token_file, read_operator_token

TIMEOUT_S = 30.0
_BY_STATUS: dict[int, type[ControllerError]] = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: InvalidInput,
    503: Unavailable,
}


class ApiClient:
    def __init__(self, base_url: str, token: str):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT_S,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON of a 2xx answer (None when empty); otherwise raise the matching ControllerError."""
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def get_bytes(self, path: str) -> bytes:
        """The body of a 2xx answer as bytes (downloads such as sample shards)."""
        return self._send("GET", path).content

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            raise Unavailable(
                f"cannot reach the controller at {self.base_url}: start it with `fleetctl controller run`"
            ) from e
        except httpx.HTTPError as e:
            raise Unavailable(f"request to the controller at {self.base_url} failed: {e}") from e
        if response.is_success:
            return response
        raise _BY_STATUS.get(response.status_code, ControllerError)(_message(response))

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def close(self) -> None:
        self._http.close()


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else f"controller answered HTTP {response.status_code}"


def read_token(home: Path) -> str:
    token = read_operator_token(home)
    if token is None:
        raise Unauthorized(f"no operator token at {operator_token_file(home)}: run `fleetctl init` or pass --token")
    return token


def connect(controller: str | None, token: str | None) -> ApiClient:
    """A client for --controller/--token, falling back to the fleet home's config and token file."""
    config = ControllerConfig.load()
    return ApiClient(controller or config.public_url, token or read_token(config.home))


def api_command(function: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --controller and --token and passes ``client: ApiClient`` to the command."""

    @click.option("--controller", envvar="EDGEFLEET_CONTROLLER", show_envvar=True, metavar="URL",
                  help="Controller API URL (default: public_url of HOME/config.toml).")
    @click.option("--token", envvar="EDGEFLEET_TOKEN", show_envvar=True, metavar="TOKEN",
                  help="Operator token (default: HOME/operator-token).")
    @functools.wraps(function)
    def wrapper(*args: Any, controller: str | None, token: str | None, **kwargs: Any) -> Any:
        client = connect(controller, token)
        try:
            return function(*args, client=client, **kwargs)
        finally:
            client.close()

    return wrapper

