"""Talking to Vault or OpenBao: connection settings, login, and one error boundary.

The ``vault_transit`` key manager and the ``vault_pki`` upstream authority
share this client. It reads the connection settings from the plugin's table,
logs in with a token or with AppRole, logs in once more when a request is
refused (an expired token looks like a refusal), and turns every hvac and
requests error into a :mod:`sdk.errors` type whose message says what to do::

    class TransitSettings(VaultConnection):      # the plugin's settings model
        mount: str = "transit"

    parsed = parse_settings(TransitSettings, config, "[key_manager.vault_transit]")
    settings = VaultSettings.from_connection(parsed, plugin="key manager 'vault_transit'")
    client = VaultClient(settings, plugin="key manager 'vault_transit'")
    data = client.read("transit/keys/tessera-x509-1", policy_path="transit/keys/tessera-*")

Connection settings (every Vault/OpenBao plugin's settings model extends
:class:`VaultConnection`, so it takes them):

==========================  ==================================================================
``address``                 ``https://vault.example.org:8200``; default ``VAULT_ADDR`` or
                            ``BAO_ADDR``
``namespace``               namespace to work in (Vault Enterprise / OpenBao namespaces)
``token``                   a token; default ``VAULT_TOKEN`` or ``BAO_TOKEN``
``token_file``              a file holding the token, read again when a request is refused
                            (e.g. the sink of a Vault/OpenBao agent)
``approle_role_id``         log in with AppRole: the role id ...
``approle_secret_id``       ... and the secret id, or
``approle_secret_id_file``  ... a file holding it, read at each login
``approle_mount``           where AppRole is mounted; default ``approle``
``ca_cert``                 PEM CA bundle to verify Vault's TLS certificate; default
                            ``VAULT_CACERT`` or ``BAO_CACERT``, else the system's roots
``timeout``                 seconds (or ``10s``, ``1m``) per request; default 10
==========================  ==================================================================

Errors: unreachable or sealed -> :class:`~sdk.errors.Unavailable`; refused ->
:class:`~sdk.errors.PermissionDenied` naming the path and capability to grant;
a failed AppRole login -> :class:`~sdk.errors.Unauthenticated`; nothing
mounted at a path -> :class:`~sdk.errors.ConfigError`; any other error answer
-> :class:`VaultRequestFailed`. Tokens and secret ids are never logged and
never appear in a message.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import hvac
import hvac.exceptions
import requests
from pydantic import BeforeValidator, Field

from attestor.plugin import parse_settings
from attestor.settings import FilePath, Settings
from ca.errors import CAError
from sdk.durations import parse_duration
from sdk.errors import (
    ConfigError,
    InvalidArgument,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "CONNECTION_SETTINGS",
    "AppRoleLogin",
    "StaticToken",
    "TokenFile",
    "VaultClient",
    "VaultConnection",
    "VaultRequestFailed",
    "VaultSettings",
]

log = logging.getLogger(__name__)

ADDRESS_VARIABLES = ("VAULT_ADDR", "BAO_ADDR")
TOKEN_VARIABLES = ("VAULT_TOKEN", "BAO_TOKEN")
CA_CERT_VARIABLES = ("VAULT_CACERT", "BAO_CACERT")
DEFAULT_TIMEOUT = 10.0
DEFAULT_APPROLE_MOUNT = "approle"
_ERROR_COUNT = re.compile(r"\d+ errors? occurred:")


class VaultRequestFailed(CAError):
    """Vault/OpenBao answered with an error that is not about access, absence or availability.

    ``errors`` holds Vault's own error strings, so a plugin can recognise one
    and say something more precise.
    """

    status = 502

    def __init__(self, message: str, *, status_code: int, errors: tuple[str, ...]) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.errors = errors

    @property
    def reason(self) -> str:
        """Vault's errors on one line."""
        return _joined(self.errors) or f"HTTP {self.status_code}"


# --- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticToken:
    token: str = field(repr=False)
    source: str  # said in messages: "the token setting", "the VAULT_TOKEN environment variable"


@dataclass(frozen=True)
class TokenFile:
    path: Path

    def read(self) -> str:
        try:
            token = self.path.read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"cannot read the Vault/OpenBao token file {self.path} ({err.strerror}); "
                "check the token_file setting and the file's permissions"
            ) from None
        if not token:
            raise ConfigError(f"the Vault/OpenBao token file {self.path} is empty")
        return token


@dataclass(frozen=True)
class AppRoleLogin:
    role_id: str
    secret_id: str | None = field(default=None, repr=False)
    secret_id_file: Path | None = None
    mount: str = DEFAULT_APPROLE_MOUNT

    def secret(self) -> str:
        if self.secret_id is not None:
            return self.secret_id
        assert self.secret_id_file is not None
        try:
            secret = self.secret_id_file.read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"cannot read the AppRole secret id file {self.secret_id_file} "
                f"({err.strerror}); check the approle_secret_id_file setting and the "
                "file's permissions"
            ) from None
        if not secret:
            raise ConfigError(f"the AppRole secret id file {self.secret_id_file} is empty")
        return secret


Credentials = StaticToken | TokenFile | AppRoleLogin


def _timeout_seconds(value: Any) -> Any:
    """Seconds as a number, or a duration such as ``10s``; more than zero."""
    if isinstance(value, float):
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be seconds or a duration such as 10s, got {value!r}")
    try:
        return parse_duration(value).total_seconds()
    except InvalidArgument as err:
        raise ValueError(err.message.removeprefix("duration ")) from None


class VaultConnection(Settings):
    """The connection settings every Vault/OpenBao plugin takes; its model extends this."""

    address: str | None = None
    namespace: str | None = None
    token: str | None = Field(default=None, repr=False)  # repr=False: never in a message
    token_file: FilePath | None = None
    approle_role_id: str | None = None
    approle_secret_id: str | None = Field(default=None, repr=False)
    approle_secret_id_file: FilePath | None = None
    approle_mount: str | None = None
    ca_cert: FilePath | None = None
    timeout: Annotated[float, BeforeValidator(_timeout_seconds)] = DEFAULT_TIMEOUT


CONNECTION_SETTINGS = frozenset(VaultConnection.model_fields)


@dataclass(frozen=True)
class VaultSettings:
    address: str
    credentials: Credentials
    namespace: str | None = None
    ca_cert: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        plugin: str,
        environ: Mapping[str, str] | None = None,
    ) -> VaultSettings:
        """The connection settings of ``config``, which holds only those; see
        :meth:`from_connection`."""
        connection = parse_settings(VaultConnection, config, plugin)
        return cls.from_connection(connection, plugin=plugin, environ=environ)

    @classmethod
    def from_connection(
        cls,
        connection: VaultConnection,
        *,
        plugin: str,
        environ: Mapping[str, str] | None = None,
    ) -> VaultSettings:
        """The parsed connection settings with the environment's defaults filled in;
        ConfigError naming what is wrong."""
        env = os.environ if environ is None else environ
        address = _text(connection.address) or _first_variable(env, ADDRESS_VARIABLES)
        if not address:
            raise ConfigError(
                f"{plugin} does not know where Vault/OpenBao is; set address "
                "(e.g. \"https://vault.example.org:8200\") or VAULT_ADDR"
            )
        if not address.startswith(("http://", "https://")):
            raise ConfigError(
                f"{plugin} address {address!r} is not an http:// or https:// URL"
            )
        ca_cert = _path(connection.ca_cert)
        if ca_cert is None:
            from_env = _first_variable(env, CA_CERT_VARIABLES)
            ca_cert = Path(from_env) if from_env else None
        if ca_cert is not None and not ca_cert.is_file():
            raise ConfigError(
                f"{plugin} ca_cert {ca_cert} is not a readable file; point it at the PEM "
                "CA certificate that signed Vault/OpenBao's TLS certificate"
            )
        return cls(
            address=address.rstrip("/"),
            credentials=_credentials(connection, plugin, env),
            namespace=_text(connection.namespace),
            ca_cert=ca_cert,
            timeout=connection.timeout,
        )


def _credentials(connection: VaultConnection, plugin: str, env: Mapping[str, str]) -> Credentials:
    token = _text(connection.token)
    token_file = _path(connection.token_file)
    role_id = _text(connection.approle_role_id)
    secret_id = _text(connection.approle_secret_id)
    secret_id_file = _path(connection.approle_secret_id_file)
    approle_mount = _text(connection.approle_mount) or DEFAULT_APPROLE_MOUNT
    chosen = [
        name
        for name, value in (("token", token), ("token_file", token_file), ("AppRole", role_id))
        if value
    ]
    if len(chosen) > 1:
        raise ConfigError(
            f"{plugin} has more than one way to log in ({' and '.join(chosen)}); "
            "set only one of token, token_file or approle_role_id"
        )
    if (secret_id or secret_id_file) and not role_id:
        raise ConfigError(f"{plugin} has an AppRole secret id but no approle_role_id; set it")
    if role_id:
        if secret_id and secret_id_file:
            raise ConfigError(
                f"{plugin} has both approle_secret_id and approle_secret_id_file; set one"
            )
        if not secret_id and not secret_id_file:
            raise ConfigError(
                f"{plugin} logs in with AppRole but has no secret id; set "
                "approle_secret_id_file (or approle_secret_id)"
            )
        return AppRoleLogin(role_id, secret_id, secret_id_file, approle_mount.strip("/"))
    if token:
        return StaticToken(token, "the token setting")
    if token_file:
        return TokenFile(token_file)
    for variable in TOKEN_VARIABLES:
        if env.get(variable, "").strip():
            return StaticToken(env[variable].strip(), f"the {variable} environment variable")
    raise ConfigError(
        f"{plugin} has no Vault/OpenBao credentials; set token_file (or token, or "
        "VAULT_TOKEN), or approle_role_id with approle_secret_id_file"
    )


def _text(value: str | None) -> str | None:
    return (value.strip() or None) if value is not None else None


def _path(value: Path | None) -> Path | None:
    return value.expanduser() if value is not None else None


def _first_variable(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


# --- the client -------------------------------------------------------------------------


class VaultClient:
    """Requests to one Vault/OpenBao server on behalf of one plugin.

    Paths are relative to ``/v1/`` (``transit/sign/<key>``). Each method takes
    the ``policy_path`` to name in a PermissionDenied message, e.g. the
    wildcard path an operator should grant rather than the exact one.
    """

    def __init__(self, settings: VaultSettings, *, plugin: str) -> None:
        self.settings = settings
        self.plugin = plugin
        self._lock = threading.Lock()
        self._hvac = hvac.Client(
            url=settings.address,
            token="",  # never let hvac read ~/.vault-token or VAULT_TOKEN by itself
            verify=str(settings.ca_cert) if settings.ca_cert else True,
            timeout=settings.timeout,
            namespace=settings.namespace,
        )
        credentials = settings.credentials
        if isinstance(credentials, StaticToken):
            self._set_token(credentials.token)
        elif isinstance(credentials, TokenFile):
            self._set_token(credentials.read())

    @property
    def address(self) -> str:
        return self.settings.address

    def read(self, path: str, *, policy_path: str | None = None) -> dict[str, Any] | None:
        """GET ``path``: the answer's ``data``, or None when nothing is there."""
        answer = self._request("get", path, None, policy_path or path, "read")
        return None if answer is None else _data(answer)

    def write(
        self,
        path: str,
        data: Mapping[str, Any],
        *,
        policy_path: str | None = None,
        capability: str = "update",
    ) -> dict[str, Any]:
        """POST ``data`` to ``path``: the answer's ``data`` ({} for an empty answer);
        a 404 is a :class:`VaultRequestFailed`."""
        answer = self._request("post", path, dict(data), policy_path or path, capability)
        if answer is None:
            raise VaultRequestFailed(
                f"Vault/OpenBao at {self.address} found nothing at {path} to write to",
                status_code=404,
                errors=(),
            )
        return _data(answer)

    def delete(self, path: str, *, policy_path: str | None = None) -> None:
        """DELETE ``path``; nothing happens when nothing is there."""
        self._request("delete", path, None, policy_path or path, "delete")

    # -- one request, with one login retry and the error boundary -----------------------

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        policy_path: str,
        capability: str,
    ) -> object | None:
        """The decoded answer (a dict, or the raw response when it had no JSON body);
        None for a 404 that means "no such object"."""
        if not self._token():
            self._login()
        for attempt in (1, 2):
            token_used = self._token()
            try:
                return self._hvac.adapter.request(method, f"/v1/{path}", json=body)  # type: ignore[no-any-return]
            except hvac.exceptions.Forbidden as err:
                if attempt == 1 and self._renew_after_refusal(token_used):
                    log.info(
                        "%s: Vault/OpenBao refused %s %s; logged in again and retrying",
                        self.plugin,
                        method.upper(),
                        path,
                    )
                    continue
                raise PermissionDenied(
                    f"Vault/OpenBao at {self.address} denied {capability} on {path} "
                    f"({_reason(err)}); the token of {self.plugin} needs a policy with "
                    f'path "{policy_path}" {{ capabilities = ["{capability}"] }} '
                    "(or it has expired)"
                ) from err
            except hvac.exceptions.InvalidPath as err:
                errors = _errors(err)
                if any("no handler for route" in error for error in errors):
                    raise ConfigError(
                        f"Vault/OpenBao at {self.address} has no secrets engine that answers "
                        f"{path}; check the mount setting of {self.plugin} and that the "
                        "engine is enabled there"
                    ) from err
                return None
            except (hvac.exceptions.VaultError, requests.RequestException) as err:
                raise self._translate(err, method, path) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def _token(self) -> str:
        return str(self._hvac.adapter.token or "")

    def _set_token(self, token: str) -> None:
        self._hvac.adapter.token = token

    def _renew_after_refusal(self, token_used: str) -> bool:
        """Get a fresh token after a refusal; False when there is no fresher one to get."""
        credentials = self.settings.credentials
        if isinstance(credentials, StaticToken):
            return False
        with self._lock:
            if self._token() != token_used:
                return True  # another thread has logged in meanwhile
            if isinstance(credentials, TokenFile):
                fresh = credentials.read()
                if fresh == token_used:
                    return False
                self._set_token(fresh)
                return True
            self._login_locked(credentials)
            return True

    def _login(self) -> None:
        credentials = self.settings.credentials
        if not isinstance(credentials, AppRoleLogin):
            return
        with self._lock:
            if not self._token():
                self._login_locked(credentials)

    def _login_locked(self, credentials: AppRoleLogin) -> None:
        path = f"auth/{credentials.mount}/login"
        try:
            answer = self._hvac.adapter.request(
                "post",
                f"/v1/{path}",
                json={"role_id": credentials.role_id, "secret_id": credentials.secret()},
            )
            token = answer["auth"]["client_token"]
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as err:
            raise Unauthenticated(
                f"AppRole login to Vault/OpenBao at {self.address} ({path}) failed "
                f"({_reason(err)}); check approle_role_id, the secret id (it may have expired "
                "or been used up) and approle_mount"
            ) from err
        except (hvac.exceptions.VaultError, requests.RequestException) as err:
            raise self._translate(err, "post", path) from err
        except (KeyError, TypeError):
            raise VaultRequestFailed(
                f"AppRole login to Vault/OpenBao at {self.address} ({path}) answered "
                "without a client token",
                status_code=200,
                errors=(),
            ) from None
        self._set_token(str(token))
        log.info("%s logged in to Vault/OpenBao at %s with AppRole", self.plugin, self.address)

    def _translate(self, err: Exception, method: str, path: str) -> TesseraError:
        where = f"Vault/OpenBao at {self.address}"
        if isinstance(err, requests.exceptions.SSLError):
            return Unavailable(
                f"{where} is unreachable: the TLS handshake failed ({_first_line(err)}); "
                "set ca_cert to the CA that signed its certificate, and check the address"
            )
        if isinstance(err, requests.RequestException):
            return Unavailable(
                f"{where} is unreachable: {_connection_reason(err)}; check address and that "
                "it is unsealed"
            )
        assert isinstance(err, hvac.exceptions.VaultError)
        if isinstance(err, hvac.exceptions.VaultDown | hvac.exceptions.VaultNotInitialized):
            return Unavailable(
                f"{where} is unreachable: it is sealed, not initialised or in standby "
                f"({_reason(err)}); check address and that it is unsealed"
            )
        if isinstance(err, hvac.exceptions.RateLimitExceeded | hvac.exceptions.BadGateway):
            return Unavailable(f"{where} is not answering {path} now ({_reason(err)})")
        if isinstance(err, hvac.exceptions.Unauthorized):
            return Unauthenticated(
                f"{where} did not accept {self.plugin}'s credentials on {path} "
                f"({_reason(err)}); check the token or AppRole settings"
            )
        status_code = _status_code(err)
        return VaultRequestFailed(
            f"{where} refused {method.upper()} {path}: {_reason(err)}",
            status_code=status_code,
            errors=_errors(err),
        )


def _data(answer: object) -> dict[str, Any]:
    if isinstance(answer, dict):
        data = answer.get("data")
        return dict(data) if isinstance(data, dict) else {}
    return {}  # an empty (204) answer


def _errors(err: hvac.exceptions.VaultError) -> tuple[str, ...]:
    errors = err.errors
    if isinstance(errors, list):
        return tuple(str(error).strip() for error in errors)
    if isinstance(errors, str):
        return (errors.strip(),)
    return ()


def _reason(err: hvac.exceptions.VaultError) -> str:
    return _joined(_errors(err)) or type(err).__name__


def _joined(errors: tuple[str, ...]) -> str:
    """Vault's error strings on one line, without its "1 error occurred:" wrapping."""
    parts = []
    for error in errors:
        for raw_line in error.splitlines():
            line = raw_line.strip().removeprefix("* ").strip()
            if line and not _ERROR_COUNT.fullmatch(line):
                parts.append(line)
    return "; ".join(parts)


_STATUS_CODES: dict[type[Exception], int] = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}


def _status_code(err: hvac.exceptions.VaultError) -> int:
    return _STATUS_CODES.get(type(err), 0)


def _connection_reason(err: requests.RequestException) -> str:
    if isinstance(err, requests.exceptions.Timeout):
        return "no answer within the timeout"
    text = _first_line(err)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "the host name does not resolve"
    return text


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
