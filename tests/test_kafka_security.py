"""choreo on secured Apache Kafka: a private CA, mutual TLS, SCRAM and OAUTHBEARER, and one-line errors.

One broker serves every scenario from its own listener: SCRAM (SASL_SSL, SCRAM-SHA-512, a
certificate for 127.0.0.1 from the test's private CA), MTLS (SSL with a required client
certificate, and a broker certificate for another name, `kafka.internal`) and OAUTH
(SASL_PLAINTEXT, Kafka's unsecured JWT validator). The certificates are made here with openssl.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from typer.testing import CliRunner

from choreo import ConfigurationError, KafkaSecurityError, KafkaSettings
from choreo.cli import EXIT_UNAVAILABLE, app
from choreo.kafka import KafkaTransport, Record
from choreo.tracing import TraceCollector
from infra.kafka import ApacheKafka, KafkaUnavailable, unavailable_reason
from tests.infra import _unavailable
from tests.test_core_infra import eventually
from tests.toy import add_stock, make_toy, order_status, place_order

infra = pytest.mark.infra
KEY_PASSWORD = "client-key-secret"


# -- certificates and the broker ---------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The test's private CA, the broker's keystores and a client certificate."""

    ca: Path
    broker: Path
    """Key and certificate for 127.0.0.1 and localhost (a PEM keystore)."""
    internal: Path
    """Key and certificate for kafka.internal only (a PEM keystore)."""
    client_cert: Path
    client_key: Path
    """Encrypted with KEY_PASSWORD."""


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _signed(directory: Path, name: str, extensions: str) -> None:
    _openssl(
        directory,
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr"),
        *("-subj", f"/CN={name}"),
    )
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"),
        *("-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext"),
    )


def make_pki(directory: Path) -> Pki:
    """A private CA, two broker certificates and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        _unavailable("no `openssl` on PATH to make the test certificates")
    _openssl(
        directory,
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2"),
        *("-subj", "/CN=choreo test CA", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    _signed(directory, "broker", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _signed(directory, "internal", "subjectAltName=DNS:kafka.internal\nextendedKeyUsage=serverAuth\n")
    _signed(directory, "client", "extendedKeyUsage=clientAuth\n")
    for name in ("broker", "internal"):  # Kafka's PEM keystore: the PKCS#8 key, then the chain
        keystore = (directory / f"{name}.key").read_text() + (directory / f"{name}.pem").read_text()
        (directory / f"{name}-keystore.pem").write_text(keystore)
    _openssl(
        directory,
        *("pkey", "-in", "client.key", "-out", "client-encrypted.key", "-aes256"),
        *("-passout", f"pass:{KEY_PASSWORD}"),
    )
    return Pki(
        ca=directory / "ca.pem",
        broker=directory / "broker-keystore.pem",
        internal=directory / "internal-keystore.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-encrypted.key",
    )


def broker_properties(pki: Pki) -> dict[str, str]:
    """Listeners SCRAM (SASL_SSL), MTLS (SSL, client certificate required) and OAUTH (SASL_PLAINTEXT)."""
    unsecured_jwt = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule"
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(pki.broker),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(pki.ca),
        "listener.name.scram.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.scram.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "listener.name.mtls.ssl.client.auth": "required",
        "listener.name.mtls.ssl.keystore.type": "PEM",
        "listener.name.mtls.ssl.keystore.location": str(pki.internal),
        "listener.name.oauth.sasl.enabled.mechanisms": "OAUTHBEARER",
        "listener.name.oauth.oauthbearer.sasl.jaas.config": (
            f'{unsecured_jwt} required unsecuredLoginStringClaim_sub="broker";'
        ),
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secured(pki: Pki) -> Iterator[ApacheKafka]:
    """One broker with the three secured listeners, and the user alice (password alice-secret)."""
    reason = unavailable_reason()
    if reason is not None:
        _unavailable(f"Apache Kafka unavailable: {reason}")
    broker = ApacheKafka(
        listeners={"SCRAM": "SASL_SSL", "MTLS": "SSL", "OAUTH": "SASL_PLAINTEXT"},
        properties=broker_properties(pki),
        scram_users={"alice": "alice-secret"},
    )
    try:
        broker.start()
    except KafkaUnavailable as error:
        _unavailable(str(error))
    try:
        yield broker
    finally:
        broker.stop()


def env_for(prefix: str, **variables: str) -> dict[str, str]:
    """A service environment: `CHOREO_KAFKA_<NAME>` for each variable, topics private to the test."""
    env = {f"CHOREO_KAFKA_{name.upper()}": value for name, value in variables.items()}
    return {**env, "CHOREO_KAFKA_TOPIC_PREFIX": f"{prefix}-", "CHOREO_KAFKA_FETCH_MAX_WAIT_MS": "100"}


def scram_env(secured: ApacheKafka, pki: Pki, prefix: str, **overrides: str) -> dict[str, str]:
    variables = {
        "bootstrap_servers": secured.address("SCRAM"),
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "alice",
        "sasl_password": "alice-secret",
        "ssl_cafile": str(pki.ca),
    }
    return env_for(prefix, **{**variables, **overrides})


def _b64(claims: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


class UnsecuredJwt:
    """Tokens for Kafka's unsecured OAUTHBEARER validator: an unsigned JWT (`alg: none`) naming a principal.

    Deliberately not a subclass of aiokafka's `AbstractTokenProvider`: any object with
    `async token()` must do.
    """

    def __init__(self, subject: str = "shop") -> None:
        self.subject = subject
        self.issued = 0

    async def token(self) -> str:
        self.issued += 1
        now = int(time.time())
        return f"{_b64({'alg': 'none'})}.{_b64({'sub': self.subject, 'iat': now, 'exp': now + 3600})}."


# -- a saga through two services, indexed by the collector ---------------------------------------


async def run_saga(tmp_path: Path, kafka: KafkaSettings, trace_kafka: KafkaSettings) -> None:
    """shop -> stock -> shop over the broker, and the collector indexes all three events."""
    toy = make_toy(f"sqlite+aiosqlite:///{tmp_path}/shop.db", f"sqlite+aiosqlite:///{tmp_path}/stock.db", kafka)
    collector = TraceCollector([toy.shop, toy.stock], f"sqlite+aiosqlite:///{tmp_path}/trace.db", kafka=trace_kafka)
    async with collector.running(), toy.shop.running(), toy.stock.running():
        await add_stock(toy.stock, "apple", 5)
        saga_id = await place_order(toy.shop, "o-1", "apple", 2)

        async def confirmed() -> bool:
            return await order_status(toy.shop, "o-1") == "CONFIRMED"

        await eventually(confirmed, timeout=30)
        await eventually(lambda: collector.stats.indexed == 3, timeout=30)
        trace = await collector.store.trace(saga_id)
        assert trace is not None
        assert [(h.event.producer, h.event.event_type) for h in trace.hops()] == [
            ("shop", "toy.order_placed"),
            ("stock", "toy.stock_reserved"),
            ("shop", "toy.order_confirmed"),
        ]


@infra
async def test_scram_sha_512_over_tls_with_a_private_ca(secured: ApacheKafka, pki: Pki, tmp_path: Path) -> None:
    env = scram_env(secured, pki, "scram")
    # The collector reads CHOREO_TRACE_KAFKA_* first: its own user would go there.
    await run_saga(tmp_path, KafkaSettings.from_env("shop", env), KafkaSettings.from_env("trace", env))


@infra
async def test_mutual_tls_with_an_encrypted_client_key(secured: ApacheKafka, pki: Pki, tmp_path: Path) -> None:
    env = env_for(
        "mtls",
        bootstrap_servers=secured.address("MTLS"),
        security_protocol="SSL",
        ssl_cafile=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
        ssl_key_password=KEY_PASSWORD,
        # This listener's certificate names kafka.internal, and we reach it as 127.0.0.1.
        ssl_check_hostname="false",
    )
    await run_saga(tmp_path, KafkaSettings.from_env("shop", env), KafkaSettings.from_env("trace", env))


@infra
async def test_oauthbearer_with_a_token_provider(secured: ApacheKafka, tmp_path: Path) -> None:
    env = env_for(
        "oauth",
        bootstrap_servers=secured.address("OAUTH"),
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_provider="tests.test_kafka_security:UnsecuredJwt",
    )
    services = KafkaSettings.from_env("shop", env)  # the services: a dotted path in the environment
    assert isinstance(services.oauth_token_provider, UnsecuredJwt)
    # The collector: a provider object in code, as `Service(kafka=KafkaSettings(...))` takes it too.
    provider = UnsecuredJwt("collector")
    collector = KafkaSettings(**{**vars(services), "oauth_token_provider": provider})
    await run_saga(tmp_path, services, collector)
    assert services.oauth_token_provider.issued > 0 and provider.issued > 0


@infra
async def test_an_ssl_context_in_client_options_reaches_every_client(
    secured: ApacheKafka, pki: Pki, tmp_path: Path
) -> None:
    context = ssl.create_default_context(cafile=pki.ca)
    context.check_hostname = False
    context.load_cert_chain(pki.client_cert, pki.client_key, KEY_PASSWORD)
    # Producer-only options still reach the producer: linger_ms goes where it is accepted.
    options = {"ssl_context": context, "linger_ms": 1, "request_timeout_ms": 20_000}
    kafka = KafkaSettings(
        bootstrap_servers=secured.address("MTLS"),
        security_protocol="SSL",
        topic_prefix="ctx-",
        fetch_max_wait_ms=100,
        client_options=options,
    )
    await run_saga(tmp_path, kafka, kafka)


# -- one-line errors, from every client choreo starts ------------------------------------------


async def start_each_client(settings: KafkaSettings) -> list[BaseException]:
    """Start the admin client, the producer and a consumer alone; what each raised."""
    errors: list[BaseException] = []
    admin, producer, consumer = (KafkaTransport(settings, client_id="probe") for _ in range(3))

    async def ignore(records: list[Record]) -> None:
        pass

    consumer.subscribe_batches(["anything"], "probe", ignore)
    for start in (
        lambda: admin.ensure_topics(["anything"]),
        producer.start,
        consumer._members[0].start,  # the consumer alone, without a producer
    ):
        try:
            await start()
        except Exception as error:
            errors.append(error)
    await producer.stop()
    await consumer.stop()
    return errors


def one_line(errors: list[BaseException]) -> str:
    """The one message all three clients failed with."""
    assert [type(error) for error in errors] == [KafkaSecurityError] * 3, errors
    messages = {str(error) for error in errors}
    assert len(messages) == 1, messages
    (message,) = messages
    assert "\n" not in message
    return message


@infra
async def test_a_wrong_password_is_one_line_naming_the_fix(secured: ApacheKafka, pki: Pki) -> None:
    env = scram_env(secured, pki, "badpw", sasl_password="not-the-password")
    message = one_line(await start_each_client(KafkaSettings.from_env("shop", env)))
    assert message.startswith(f"authentication as 'alice' with SCRAM-SHA-512 failed at {secured.address('SCRAM')}: ")
    assert "invalid credentials" in message  # the broker's own reason
    assert message.endswith("; check CHOREO_KAFKA_SASL_USERNAME/PASSWORD")


@infra
async def test_plaintext_against_a_tls_listener_says_tls_is_expected(secured: ApacheKafka) -> None:
    settings = KafkaSettings(bootstrap_servers=secured.address("MTLS"))
    assert one_line(await start_each_client(settings)) == (
        f"the listener at {secured.address('MTLS')} speaks TLS: set CHOREO_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL"
    )


@infra
async def test_a_missing_ca_names_the_cafile_setting(secured: ApacheKafka, pki: Pki) -> None:
    env = scram_env(secured, pki, "noca")
    del env["CHOREO_KAFKA_SSL_CAFILE"]  # the system's CAs never signed the broker's certificate
    message = one_line(await start_each_client(KafkaSettings.from_env("shop", env)))
    assert message == (
        f"the certificate of the broker at {secured.address('SCRAM')} is not trusted (unable to get local "
        "issuer certificate): set CHOREO_KAFKA_SSL_CAFILE to the CA that signed the broker's certificate"
    )


@infra
async def test_a_certificate_for_another_name_names_the_hostname_setting(secured: ApacheKafka, pki: Pki) -> None:
    settings = KafkaSettings(
        bootstrap_servers=secured.address("MTLS"),
        security_protocol="SSL",
        ssl_cafile=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
        ssl_key_password=KEY_PASSWORD,
    )
    message = one_line(await start_each_client(settings))
    assert message.startswith(f"the certificate of the broker at {secured.address('MTLS')} is not valid for")
    assert message.endswith("connect through a name it lists, or set CHOREO_KAFKA_SSL_CHECK_HOSTNAME=false")


@infra
async def test_no_client_certificate_names_the_certfile_setting(secured: ApacheKafka, pki: Pki) -> None:
    settings = KafkaSettings(bootstrap_servers=secured.address("MTLS"), security_protocol="SSL", ssl_cafile=str(pki.ca))
    message = one_line(await start_each_client(KafkaSettings(**{**vars(settings), "ssl_check_hostname": False})))
    assert message.startswith(f"the broker at {secured.address('MTLS')} refused the TLS handshake")
    assert message.endswith("set CHOREO_KAFKA_SSL_CERTFILE and CHOREO_KAFKA_SSL_KEYFILE")


class NoCredentials:
    async def token(self) -> str:
        raise RuntimeError("no AWS credentials found")


@infra
async def test_a_failing_token_provider_is_one_line_naming_it(secured: ApacheKafka) -> None:
    settings = KafkaSettings(
        bootstrap_servers=secured.address("OAUTH"),
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        oauth_token_provider=NoCredentials(),
    )
    message = one_line(await start_each_client(settings))
    assert message.startswith("the OAUTHBEARER token provider <tests.test_kafka_security.NoCredentials object")
    assert message.endswith("failed: RuntimeError: no AWS credentials found")


@infra
async def test_a_paused_broker_is_not_reported_as_a_security_problem(secured: ApacheKafka, pki: Pki) -> None:
    settings = KafkaSettings(
        bootstrap_servers=secured.address("MTLS"),
        security_protocol="SSL",
        ssl_cafile=str(pki.ca),
        ssl_check_hostname=False,
        client_options={"request_timeout_ms": 1000},
    )
    secured.pause()  # connections are accepted, and then nothing answers: not "does not speak TLS"
    try:
        errors = await start_each_client(settings)
    finally:
        secured.resume()
    assert [type(error) for error in errors] == [KafkaConnectionError] * 3, errors


@infra
def test_collect_shows_only_the_error_line(secured: ApacheKafka, pki: Pki, tmp_path: Path) -> None:
    env = {
        name.replace("CHOREO_KAFKA_", "CHOREO_TRACE_KAFKA_"): value
        for name, value in scram_env(secured, pki, "cli", sasl_password="not-the-password").items()
    }
    result = CliRunner().invoke(
        app,
        ["collect", "tests.dlq_app", "--db", f"sqlite+aiosqlite:///{tmp_path}/trace.db"],
        env={**env, "CHOREO_DEBUG": ""},
    )
    assert result.exit_code == EXIT_UNAVAILABLE
    assert result.stdout == ""  # no "stopped: 0 events indexed" after a collector that never started
    assert result.stderr.startswith("error: authentication as 'alice' with SCRAM-SHA-512 failed at ")
    assert result.stderr.count("\n") == 1


# -- settings, without a broker ----------------------------------------------------------------


def make_provider() -> UnsecuredJwt:
    return UnsecuredJwt("made")


TOKEN = UnsecuredJwt("ready")


@pytest.mark.parametrize(
    ("path", "subject"),
    [
        ("tests.test_kafka_security:UnsecuredJwt", "shop"),  # a class is instantiated
        ("tests.test_kafka_security:make_provider", "made"),  # a function is called
        ("tests.test_kafka_security:TOKEN", "ready"),  # an object is used as is
    ],
)
def test_the_token_provider_comes_from_a_dotted_path(path: str, subject: str) -> None:
    env = {"CHOREO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "CHOREO_KAFKA_SASL_MECHANISM": "OAUTHBEARER"}
    settings = KafkaSettings.from_env("shop", {**env, "CHOREO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER": path})
    assert isinstance(settings.oauth_token_provider, UnsecuredJwt)
    assert settings.oauth_token_provider.subject == subject


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "OAUTHBEARER"},
            "OAUTHBEARER needs a token provider: set CHOREO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER=package.module:name",
        ),
        (
            {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "OAUTHBEARER", "SASL_OAUTH_TOKEN_PROVIDER": "x"},
            "CHOREO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER='x' must be package.module:name",
        ),
        (
            {"SASL_OAUTH_TOKEN_PROVIDER": "tests.test_kafka_security:nothing"},
            "CHOREO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER='tests.test_kafka_security:nothing' cannot be imported",
        ),
        (
            {"SASL_OAUTH_TOKEN_PROVIDER": "tests.test_kafka_security:KEY_PASSWORD"},
            "CHOREO_KAFKA_SASL_OAUTH_TOKEN_PROVIDER='tests.test_kafka_security:KEY_PASSWORD' gave "
            "'client-key-secret', which has no `token()` method",
        ),
        (
            {"SSL_CAFILE": "/ca.pem"},
            "CHOREO_KAFKA_SSL_CAFILE is set but CHOREO_KAFKA_SECURITY_PROTOCOL=PLAINTEXT: set it to SSL or SASL_SSL",
        ),
        (
            {"SECURITY_PROTOCOL": "SSL", "SSL_KEYFILE": "/client.key"},
            "CHOREO_KAFKA_SSL_KEYFILE needs CHOREO_KAFKA_SSL_CERTFILE",
        ),
        (
            {"SECURITY_PROTOCOL": "SSL", "SSL_CHECK_HOSTNAME": "maybe"},
            "CHOREO_KAFKA_SSL_CHECK_HOSTNAME='maybe' must be true or false",
        ),
    ],
)
def test_security_settings_are_checked_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        KafkaSettings.from_env("shop", {f"CHOREO_KAFKA_{name}": value for name, value in env.items()})
    assert str(raised.value).startswith(message)


def test_tls_files_that_cannot_be_loaded_are_a_configuration_error(pki: Pki) -> None:
    missing = KafkaSettings(security_protocol="SSL", ssl_cafile="/nowhere/ca.pem")
    with pytest.raises(ConfigurationError, match=r"^CHOREO_KAFKA_SSL_CAFILE='/nowhere/ca.pem' cannot be read"):
        KafkaTransport(missing, client_id="shop")
    # An encrypted key without its password fails at once (OpenSSL would otherwise prompt on a terminal).
    locked = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
    )
    with pytest.raises(ConfigurationError, match="an encrypted key needs CHOREO_KAFKA_SSL_KEY_PASSWORD"):
        KafkaTransport(locked, client_id="shop")


def test_client_options_choreo_sets_itself_or_nobody_accepts_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="cannot set acks, enable_auto_commit: choreo sets them"):
        KafkaTransport(KafkaSettings(client_options={"acks": 1, "enable_auto_commit": True}), client_id="shop")
    with pytest.raises(ConfigurationError, match="has lingerms, which no aiokafka client accepts"):
        KafkaTransport(KafkaSettings(client_options={"lingerms": 5}), client_id="shop")


def test_an_unreachable_broker_is_not_reported_as_a_security_problem() -> None:
    async def start() -> None:
        transport = KafkaTransport(
            KafkaSettings(
                bootstrap_servers="127.0.0.1:1", security_protocol="SSL", client_options={"request_timeout_ms": 2000}
            ),
            client_id="shop",
        )
        await transport.start()

    with pytest.raises(Exception) as raised:
        asyncio.run(start())
    assert not isinstance(raised.value, KafkaSecurityError)
