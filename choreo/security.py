"""How choreo's Kafka clients connect to a secured broker, and why a broker refused them.

`security_for` turns `KafkaSettings` into aiokafka's TLS and SASL options, the same for the
producer, every consumer and the admin client; `options_for` adds the `client_options` each
client's constructor accepts. `start_client` starts a client and, when the broker refuses the
connection, explains it in one line naming the broker, the mechanism and the setting to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import IllegalSaslStateError, KafkaError, SaslAuthenticationFailed, UnsupportedSaslMechanismError
from aiokafka.protocol.metadata import MetadataRequest

from choreo.exceptions import ConfigurationError, KafkaSecurityError
from choreo.settings import KafkaSettings


def security_for(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's security keyword arguments for the configured protocol, the same for every client."""
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.endswith("SSL") and "ssl_context" not in settings.client_options:
        options["ssl_context"] = ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        if settings.sasl_mechanism == "OAUTHBEARER":
            options["sasl_oauth_token_provider"] = _TokenProvider(settings.oauth_token_provider)
        else:
            options["sasl_plain_username"] = settings.sasl_username
            options["sasl_plain_password"] = settings.sasl_password
    return options


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """The TLS context: trust `ssl_cafile` (else the system's CAs), present the client certificate if any."""
    try:
        context = ssl.create_default_context(cafile=settings.ssl_cafile)
    except OSError as error:  # ssl.SSLError is an OSError too
        raise ConfigurationError(f"CHOREO_KAFKA_SSL_CAFILE={settings.ssl_cafile!r} cannot be read: {error}") from None
    context.check_hostname = settings.ssl_check_hostname
    if settings.ssl_certfile:
        try:
            # A password of "" rather than None: None makes OpenSSL prompt on the terminal.
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_key_password or "")
        except OSError as error:
            raise ConfigurationError(
                f"CHOREO_KAFKA_SSL_CERTFILE={settings.ssl_certfile!r} with CHOREO_KAFKA_SSL_KEYFILE="
                f"{settings.ssl_keyfile!r} cannot be loaded ({error}); an encrypted key needs "
                "CHOREO_KAFKA_SSL_KEY_PASSWORD"
            ) from None
    return context


class _TokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """Any object with `token()` as the `AbstractTokenProvider` aiokafka insists on (it checks the type)."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    async def token(self) -> str:
        try:
            token = self.provider.token()
            return str(await token if inspect.isawaitable(token) else token)
        except Exception as error:
            raise KafkaSecurityError(
                f"the OAUTHBEARER token provider {self.provider!r} failed: {type(error).__name__}: {error}"
            ) from error

    def extensions(self) -> dict[str, str]:
        extensions = getattr(self.provider, "extensions", None)
        return dict(extensions()) if callable(extensions) else {}


# Set by choreo for its guarantees (acks, idempotence, manual commits) or from KafkaSettings fields.
_CHOREO_OPTIONS = frozenset(
    {"bootstrap_servers", "client_id", "group_id", "acks", "enable_idempotence", "enable_auto_commit"}
    | {"auto_offset_reset", "fetch_max_wait_ms", "max_poll_records", "topics", "loop"}
)
_CLIENTS = (AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient)


def check_client_options(settings: KafkaSettings) -> None:
    """Refuse `client_options` that no client accepts or that choreo sets itself."""
    owned = sorted(_CHOREO_OPTIONS & settings.client_options.keys())
    if owned:
        raise ConfigurationError(
            f"KafkaSettings.client_options cannot set {', '.join(owned)}: choreo sets them, from "
            "KafkaSettings fields or to keep its delivery guarantees"
        )
    known = {name for client in _CLIENTS for name in inspect.signature(client).parameters}
    unknown = sorted(settings.client_options.keys() - known)
    if unknown:
        raise ConfigurationError(
            f"KafkaSettings.client_options has {', '.join(unknown)}, which no aiokafka client accepts"
        )


def options_for(client: Callable[..., Any], settings: KafkaSettings, security: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments every choreo client of this type gets: address, security, accepted `client_options`."""
    accepted = inspect.signature(client).parameters
    options = {"bootstrap_servers": settings.bootstrap_servers, **security, **settings.client_options}
    return {name: value for name, value in options.items() if name in accepted}


async def start_client(client: Any, settings: KafkaSettings, options: dict[str, Any]) -> None:
    """Start an aiokafka client; a security mismatch becomes one `KafkaSecurityError` line.

    aiokafka logs why each bootstrap server failed and raises only "Unable to bootstrap", so
    on failure one more connection, made by hand with the same options, finds the reason.
    """
    try:
        await client.start()
    except Exception as error:
        with contextlib.suppress(Exception):
            await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
        if isinstance(error, KafkaError) and (reason := await diagnose(settings, options)):
            raise KafkaSecurityError(reason) from error
        raise


_PROBE_TIMEOUT = 5.0
"""Seconds a diagnosing connection may take, at most (less if `request_timeout_ms` is shorter)."""


async def diagnose(settings: KafkaSettings, options: dict[str, Any]) -> str | None:
    """Why the brokers refuse a connection made with `options`, naming the fix; None if no security reason."""
    accepted = inspect.signature(create_conn).parameters
    connection = {name: value for name, value in options.items() if name in accepted and name != "bootstrap_servers"}
    timeout = min(_PROBE_TIMEOUT, options.get("request_timeout_ms", 40_000) / 1000)
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        connected = False
        try:
            async with asyncio.timeout(timeout):
                conn = await create_conn(host, int(port), **connection)
                connected = True  # the broker answered ApiVersions
                try:
                    await conn.send(MetadataRequest([]))
                finally:
                    conn.close()
        except Exception as error:
            reason = await _explain(error, host, int(port), connected, settings, options, timeout)
            if reason is not None:
                return reason
    return None


async def _explain(
    error: BaseException,
    host: str,
    port: int,
    connected: bool,
    settings: KafkaSettings,
    options: dict[str, Any],
    timeout: float,
) -> str | None:
    address = f"{host}:{port}"
    protocol, mechanism = options.get("security_protocol", "PLAINTEXT"), options.get("sasl_mechanism")
    if isinstance(error, KafkaSecurityError):  # from the token provider
        return str(error)
    if isinstance(error, TimeoutError):
        return None  # a slow or paused broker says nothing about security
    if isinstance(error, SaslAuthenticationFailed):
        said = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)  # the broker's reason
        if mechanism == "OAUTHBEARER":
            return (
                f"authentication with OAUTHBEARER failed at {address}: {said}; check the token of "
                "CHOREO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER"
            )
        return (
            f"authentication as {options.get('sasl_plain_username')!r} with {mechanism} failed at {address}: "
            f"{said}; check CHOREO_KAFKA_SASL_USERNAME/PASSWORD"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return f"the listener at {address} does not enable SASL mechanism {mechanism}: set CHOREO_KAFKA_SASL_MECHANISM"
    # aiokafka reports a connection the broker (or TLS) closed as KafkaConnectionError from the cause.
    cause = error.__cause__ if isinstance(error, KafkaError) and error.__cause__ is not None else error
    if isinstance(cause, ssl.SSLCertVerificationError):
        if "mismatch" in (cause.verify_message or ""):
            return (
                f"the certificate of the broker at {address} is not valid for {host!r} ({cause.verify_message}): "
                "connect through a name it lists, or set CHOREO_KAFKA_SSL_CHECK_HOSTNAME=false"
            )
        return (
            f"the certificate of the broker at {address} is not trusted ({cause.verify_message}): "
            "set CHOREO_KAFKA_SSL_CAFILE to the CA that signed the broker's certificate"
        )
    if isinstance(cause, ssl.SSLError) and "ALERT" in (cause.reason or ""):
        if settings.ssl_certfile is None and "ssl_context" not in settings.client_options:
            return (
                f"the broker at {address} refused the TLS handshake ({cause.reason}): it probably requires a "
                "client certificate; set CHOREO_KAFKA_SSL_CERTFILE and CHOREO_KAFKA_SSL_KEYFILE"
            )
        return (
            f"the broker at {address} rejected the client certificate ({cause.reason}): it must be signed "
            "by a CA the broker trusts (its ssl.truststore)"
        )
    tls = await _speaks_tls(host, port, timeout)
    if tls is None:
        return None  # unreachable: not a security problem
    sasl = protocol.startswith("SASL")
    if tls and not protocol.endswith("SSL"):
        return f"the listener at {address} speaks TLS: set CHOREO_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL"
    if not tls and protocol.endswith("SSL"):
        return (
            f"the listener at {address} does not speak TLS: set CHOREO_KAFKA_SECURITY_PROTOCOL=PLAINTEXT "
            "or SASL_PLAINTEXT"
        )
    if isinstance(error, IllegalSaslStateError):
        fix = "SSL" if tls else "PLAINTEXT"
        return f"the listener at {address} does not use SASL: set CHOREO_KAFKA_SECURITY_PROTOCOL={fix}"
    if connected and not sasl:
        # A SASL listener answers ApiVersions before authentication, then closes on anything else.
        fix = "SASL_SSL" if tls else "SASL_PLAINTEXT"
        return (
            f"the listener at {address} closed the connection after the handshake: it probably expects SASL; "
            f"set CHOREO_KAFKA_SECURITY_PROTOCOL={fix} and CHOREO_KAFKA_SASL_MECHANISM"
        )
    return None


async def _speaks_tls(host: str, port: int, timeout: float) -> bool | None:
    """Whether the listener answers a TLS handshake; None when nothing listens there."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol matters here, not whom we talk to
    for use_tls in (False, True):
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port, ssl=context if use_tls else None)
        except ssl.SSLError as error:
            return "ALERT" in (error.reason or "")  # a TLS alert is TLS refusing us
        except TimeoutError:  # before OSError, its base class: silence proves nothing
            return None
        except OSError:
            return False if use_tls else None
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return True
