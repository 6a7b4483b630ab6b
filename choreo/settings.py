"""Service settings from arguments or the environment.

Lookup order for each setting: the `Service(...)` argument, then `CHOREO_<SERVICE>_<NAME>`
(e.g. `CHOREO_ORDERS_DATABASE_URL`, so several services can share one environment), then
`CHOREO_<NAME>`, then the conventional unprefixed variable where one exists
(`DATABASE_URL`, `KAFKA_BOOTSTRAP_SERVERS`).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from choreo.cleanup import Retention
from choreo.exceptions import ConfigurationError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
OFFSET_RESETS = ("earliest", "latest")


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, setting: str) -> timedelta:
    """`500ms`, `30s`, `15m`, `12h` or `7d` as a timedelta; `setting` names it in the error."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ConfigurationError(f"{setting}={text!r} is not a duration; write e.g. 30s, 15m, 12h or 7d")
    return timedelta(seconds=float(match[1]) * _SECONDS[match[2]])


def lookup(name: str, service: str, env: Mapping[str, str], *, fallback: str | None = None) -> tuple[str, str] | None:
    """(variable, value) of the first variable set for setting `name`, or None."""
    candidates = [f"CHOREO_{service.upper().replace('-', '_')}_{name}", f"CHOREO_{name}"]
    if fallback:
        candidates.append(fallback)
    for variable in candidates:
        value = env.get(variable)
        if value:
            return variable, value
    return None


def _int(name: str, service: str, env: Mapping[str, str], default: int, minimum: int) -> int:
    found = lookup(name, service, env)
    if found is None:
        return default
    variable, raw = found
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{variable}={raw!r} must be a whole number") from None
    if value < minimum:
        raise ConfigurationError(f"{variable}={value} must be at least {minimum}")
    return value


def _bool(name: str, service: str, env: Mapping[str, str], default: bool) -> bool:
    found = lookup(name, service, env)
    if found is None:
        return default
    variable, raw = found
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{variable}={raw!r} must be true or false (1/0, yes/no)")


@dataclass(frozen=True)
class KafkaSettings:
    """How a service reaches Kafka."""

    bootstrap_servers: str = "localhost:9092"
    fetch_max_wait_ms: int = 500
    idempotence: bool = True
    partitions: int | None = None
    """Partition count for topics choreo creates; None leaves it to the broker's default."""
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    oauth_token_provider: Any = None
    """For OAUTHBEARER: an object with `async def token() -> str` (aiokafka's
    `AbstractTokenProvider`), e.g. `MSKAuthTokenProvider`-backed; asked at every connection."""
    ssl_cafile: str | None = None
    """PEM file of the CA(s) that signed the broker's certificate; None trusts the system's CAs."""
    ssl_certfile: str | None = None
    """PEM client certificate (chain) for mutual TLS; `ssl_keyfile` holds its key unless this file does."""
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True
    """False accepts a broker certificate for another name (the chain is still verified)."""
    max_poll_records: int = 500
    """Records handed to the consumer per poll."""
    commit_interval_ms: int = 100
    """Consumed offsets are committed at most this often (records are deduplicated by the inbox
    if a crash makes Kafka deliver them again)."""
    auto_offset_reset: str = "earliest"
    """Where a consumer group without a committed offset starts: `earliest` (the whole
    retained topic, right when a service joins an existing flow) or `latest` (only new records)."""
    drain_timeout_ms: int = 10_000
    """How long a rebalance or a stop waits for the batch in hand before handing over anyway."""
    topic_prefix: str = ""
    """Prepended to every topic on the wire, so several environments can share a cluster."""
    group_prefix: str | None = None
    """Prepended to every consumer group id; None means the topic prefix, so that environments
    sharing a cluster never share (and rebalance) a consumer group."""
    client_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for aiokafka's clients, each given to every client that accepts it:
    `ssl_context` or `request_timeout_ms` reach the producer, the consumers and the admin client,
    `linger_ms` only the producer. They win over what choreo derives from the other fields."""

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> KafkaSettings:
        """Read `CHOREO_KAFKA_*` (and `KAFKA_BOOTSTRAP_SERVERS`) for `service`."""
        env = os.environ if env is None else env
        servers = lookup("KAFKA_BOOTSTRAP_SERVERS", service, env, fallback="KAFKA_BOOTSTRAP_SERVERS")
        protocol = lookup("KAFKA_SECURITY_PROTOCOL", service, env)
        mechanism = lookup("KAFKA_SASL_MECHANISM", service, env)
        username = lookup("KAFKA_SASL_USERNAME", service, env)
        password = lookup("KAFKA_SASL_PASSWORD", service, env)
        partitions = lookup("KAFKA_PARTITIONS", service, env)
        prefix = lookup("KAFKA_TOPIC_PREFIX", service, env)
        group_prefix = lookup("KAFKA_GROUP_PREFIX", service, env)
        reset = lookup("KAFKA_AUTO_OFFSET_RESET", service, env)
        provider = lookup("KAFKA_SASL_OAUTH_TOKEN_PROVIDER", service, env)
        ssl_files = {
            name: found[1] if (found := lookup(f"KAFKA_SSL_{name.upper()}", service, env)) else None
            for name in ("cafile", "certfile", "keyfile", "key_password")
        }
        settings = cls(
            bootstrap_servers=servers[1] if servers else cls.bootstrap_servers,
            fetch_max_wait_ms=_int("KAFKA_FETCH_MAX_WAIT_MS", service, env, 500, 0),
            max_poll_records=_int("KAFKA_MAX_POLL_RECORDS", service, env, 500, 1),
            commit_interval_ms=_int("KAFKA_COMMIT_INTERVAL_MS", service, env, 100, 0),
            drain_timeout_ms=_int("KAFKA_DRAIN_TIMEOUT_MS", service, env, 10_000, 0),
            auto_offset_reset=reset[1].strip().lower() if reset else "earliest",
            idempotence=_bool("KAFKA_IDEMPOTENCE", service, env, True),
            partitions=_int("KAFKA_PARTITIONS", service, env, 1, 1) if partitions else None,
            security_protocol=protocol[1].upper() if protocol else "PLAINTEXT",
            sasl_mechanism=mechanism[1].upper() if mechanism else None,
            sasl_username=username[1] if username else None,
            sasl_password=password[1] if password else None,
            oauth_token_provider=token_provider(*provider) if provider else None,
            ssl_cafile=ssl_files["cafile"],
            ssl_certfile=ssl_files["certfile"],
            ssl_keyfile=ssl_files["keyfile"],
            ssl_key_password=ssl_files["key_password"],
            ssl_check_hostname=_bool("KAFKA_SSL_CHECK_HOSTNAME", service, env, True),
            topic_prefix=prefix[1] if prefix else "",
            group_prefix=group_prefix[1] if group_prefix else None,
        )
        settings.validate()
        return settings

    def group(self, group_id: str) -> str:
        """The consumer group id on the wire for `group_id`."""
        return (self.topic_prefix if self.group_prefix is None else self.group_prefix) + group_id

    def validate(self) -> None:
        """Raise ConfigurationError naming the setting to fix."""
        if not self.bootstrap_servers.strip():
            raise ConfigurationError("KAFKA_BOOTSTRAP_SERVERS is empty; set it to host:port[,host:port]")
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigurationError(
                    f"Kafka bootstrap server {server.strip()!r} is not host:port "
                    "(CHOREO_KAFKA_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS)"
                )
        if self.auto_offset_reset not in OFFSET_RESETS:
            raise ConfigurationError(
                f"CHOREO_KAFKA_AUTO_OFFSET_RESET={self.auto_offset_reset!r}: use earliest (a new consumer "
                "group reads the retained topic from its start) or latest (only records published from now on)"
            )
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ConfigurationError(
                f"CHOREO_KAFKA_SECURITY_PROTOCOL={self.security_protocol!r}: use one of {', '.join(SECURITY_PROTOCOLS)}"
            )
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigurationError(
                    f"{self.security_protocol} needs CHOREO_KAFKA_SASL_MECHANISM, one of "
                    f"{', '.join(SASL_MECHANISMS)} (got {self.sasl_mechanism!r})"
                )
            if self.sasl_mechanism == "OAUTHBEARER":
                if not callable(getattr(self.oauth_token_provider, "token", None)):
                    raise ConfigurationError(
                        "OAUTHBEARER needs a token provider: set CHOREO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER="
                        "package.module:name or pass KafkaSettings(oauth_token_provider=...), an object "
                        "with `async def token() -> str`"
                    )
            elif not self.sasl_username or not self.sasl_password:
                raise ConfigurationError(
                    f"{self.security_protocol} needs CHOREO_KAFKA_SASL_USERNAME and CHOREO_KAFKA_SASL_PASSWORD"
                )
        tls = {"CAFILE": self.ssl_cafile, "CERTFILE": self.ssl_certfile, "KEYFILE": self.ssl_keyfile}
        if not self.security_protocol.endswith("SSL"):
            for name, value in tls.items():
                if value:
                    raise ConfigurationError(
                        f"CHOREO_KAFKA_SSL_{name} is set but CHOREO_KAFKA_SECURITY_PROTOCOL="
                        f"{self.security_protocol}: set it to SSL or SASL_SSL to connect with TLS"
                    )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigurationError("CHOREO_KAFKA_SSL_KEYFILE needs CHOREO_KAFKA_SSL_CERTFILE, its certificate")


def token_provider(variable: str, path: str) -> Any:
    """The OAUTHBEARER token provider named by `path` (`package.module:name`), called if callable."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{variable}={path!r} must be package.module:name (a class or function)")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ConfigurationError(f"{variable}={path!r} cannot be imported: {error}") from None
    provider = target
    # A class or a factory function is called once; an object with `token()` is used as is.
    if isinstance(target, type) or (callable(target) and not callable(getattr(target, "token", None))):
        try:
            provider = target()
        except Exception as error:
            raise ConfigurationError(f"{variable}={path!r} failed: {type(error).__name__}: {error}") from None
    if not callable(getattr(provider, "token", None)):
        raise ConfigurationError(f"{variable}={path!r} gave {provider!r}, which has no `token()` method")
    return provider


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_level_from_env(env: Mapping[str, str] | None = None) -> str:
    """`LOG_LEVEL` (debug, info, warning or error; default info) of a long-running process."""
    env = os.environ if env is None else env
    level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
    if level not in LOG_LEVELS:
        raise ConfigurationError(f"LOG_LEVEL={level!r}: use {', '.join(LOG_LEVELS)}")
    return level


def retention_from_env(service: str, env: Mapping[str, str] | None = None) -> Retention:
    """Retention from `CHOREO_OUTBOX_RETENTION` / `CHOREO_INBOX_RETENTION` (e.g. 7d, 12h)."""
    env = os.environ if env is None else env
    default = Retention()
    outbox, inbox = (lookup(name, service, env) for name in ("OUTBOX_RETENTION", "INBOX_RETENTION"))
    return Retention(
        outbox=parse_duration(outbox[1], outbox[0]) if outbox else default.outbox,
        inbox=parse_duration(inbox[1], inbox[0]) if inbox else default.inbox,
    )


def database_url(service: str, env: Mapping[str, str] | None = None) -> str:
    """The service's database URL from the environment, else a SQLite file named after it."""
    env = os.environ if env is None else env
    found = lookup("DATABASE_URL", service, env, fallback="DATABASE_URL")
    return found[1] if found else f"sqlite+aiosqlite:///{service}.db"


def relay_takeover_timeout(service: str, env: Mapping[str, str] | None = None) -> float:
    """Seconds within which a standby relay takes over from a silent leader (`CHOREO_RELAY_TAKEOVER_TIMEOUT`)."""
    seconds = _seconds("RELAY_TAKEOVER_TIMEOUT", service, env, default=30.0)
    if seconds < 5:
        # Below a few seconds a leader paused by a busy host or a slow publish would lose its lock.
        raise ConfigurationError(f"CHOREO_RELAY_TAKEOVER_TIMEOUT={seconds:g}s must be at least 5s")
    return seconds


def start_timeout(service: str, env: Mapping[str, str] | None = None) -> float:
    """Seconds `start()` waits for the database and Kafka to answer (`CHOREO_START_TIMEOUT`, 0: not at all)."""
    return _seconds("START_TIMEOUT", service, env, default=60.0)


def _seconds(name: str, service: str, env: Mapping[str, str] | None, *, default: float) -> float:
    found = lookup(name, service, os.environ if env is None else env)
    if found is None:
        return default
    variable, raw = found
    return (parse_duration(raw, variable) if not raw.strip().isdigit() else timedelta(seconds=int(raw))).total_seconds()
