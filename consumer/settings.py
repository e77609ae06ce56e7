"""The one configuration object, built once by the CLI and passed down explicitly.

Field names are the environment variable names in lower case, so an operator reading an
error or the code sees the same name they set. Values also come from a `.env` file.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import urlsplit

import phonenumbers
from pydantic import (
    AnyHttpUrl,
    Field,
    PostgresDsn,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

TWILIO_DEFAULT_API_URL = "https://api.twilio.com"
# The credentials `smsq fake-twilio` accepts by default, which `smsq dispatch` uses against a
# sandbox when none are given. Shaped as Twilio's (AC + 32 hex digits); the same account as
# the sandbox of scripts/run.sh and docker-compose.yml.
SANDBOX_ACCOUNT_SID = "AC" + "0" * 32
SANDBOX_AUTH_TOKEN = "fake-token"
POSTGRES_CONNECT_TIMEOUT = 5  # seconds, per host


_BLANK = re.compile(r"\s")
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[?[0-9A-Fa-f:.]+\]?")
_E164 = re.compile(r"\+[1-9]\d{6,14}")
_MESSAGING_SERVICE = re.compile(r"MG[0-9A-Za-z]+")


def is_sender_number(value: str) -> bool:
    """E.164 and possible for its country: Twilio's test numbers (+1500555xxxx) pass."""
    if not _E164.fullmatch(value):
        return False
    return phonenumbers.is_possible_number(phonenumbers.parse(value))


def _sid(value: str | None, prefix: str, what: str) -> str | None:
    if value is None or value == "":
        return None
    # Twilio's are 32 hex digits after the prefix; only the prefix and the alphabet are
    # checked, so that sandboxes and tests may spell theirs.
    if not re.fullmatch(prefix + r"[0-9A-Za-z]+", value):
        raise ValueError(f"must be {what}: {prefix} followed by letters and digits "
                         f"(e.g. {prefix}0123456789abcdef0123456789abcdef)")
    return value


def split_amqp_urls(value: str) -> list[str]:
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _amqp_url_problem(entry: str) -> str | None:
    if not entry:
        return "empty (a stray comma?)"
    if not entry.startswith(("amqp://", "amqps://")):
        return "must start with amqp:// or amqps://"
    try:
        parts = urlsplit(entry)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "not a URL (amqp://user:password@host:port/vhost)"
    if not parts.hostname:
        return "names no host (amqp://user:password@host:port/vhost)"
    return None


def with_connect_timeout(dsn: str) -> str:
    """A connect_timeout when the URL gives none: each host is tried for that long, so a
    black-holed first host of a multi-host URL does not hold the others up for minutes."""
    if "connect_timeout=" in dsn:
        return dsn
    return f"{dsn}{'&' if '?' in dsn else '?'}connect_timeout={POSTGRES_CONNECT_TIMEOUT}"


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False,
        # `SMSQ_METRICS_PORT=` in an env file means unset, as an operator would expect.
        env_ignore_empty=True,
    )

    database_url: PostgresDsn = PostgresDsn("postgresql://postgres@127.0.0.1:5432/smsq")
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"

    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_phone_number: str | None = None
    twilio_messaging_service_sid: str | None = None
    twilio_sms_batch_size: int = Field(100, ge=1, le=10_000)
    twilio_sms_rate: float = Field(1.0, gt=0)
    twilio_api_url: AnyHttpUrl = AnyHttpUrl(TWILIO_DEFAULT_API_URL)

    smsq_public_url: AnyHttpUrl | None = None
    smsq_burst: float = Field(1.0, ge=1)
    smsq_max_attempts: int = Field(10, ge=1)
    smsq_retry_backoff: float = Field(5.0, gt=0)
    smsq_retry_backoff_max: float = Field(600.0, gt=0)
    smsq_lease_seconds: float = Field(60.0, gt=0)
    smsq_default_region: str | None = None
    smsq_http_host: str = "127.0.0.1"
    smsq_http_port: int = Field(8000, ge=1, le=65535)
    smsq_metrics_port: int = Field(0, ge=0, le=65535)
    # 127.0.0.1: a Prometheus on this machine; 0.0.0.0 for one elsewhere (a container's peer).
    smsq_metrics_host: str = "127.0.0.1"
    smsq_dashboard_user: str | None = None
    smsq_dashboard_password: SecretStr | None = None
    # Hosted media outlives its sending by this grace period (Twilio fetches it afterwards);
    # `smsq serve` deletes expired media every SMSQ_MEDIA_CLEANUP_SECONDS.
    smsq_media_grace_seconds: float = Field(86_400.0, ge=0)
    smsq_media_cleanup_seconds: float = Field(300.0, gt=0)

    # `smsq serve` on the open internet. Cookies are Secure when SMSQ_PUBLIC_URL is https,
    # unless this says otherwise. X-Forwarded-For is believed from these addresses only.
    smsq_secure_cookies: bool | None = None
    smsq_trusted_proxies: str = "127.0.0.1"
    # A client must send its request headers, then its body, within these many seconds;
    # past SMSQ_HTTP_MAX_CONNECTIONS open connections, new requests are answered 503.
    smsq_http_header_timeout: float = Field(10.0, gt=0)
    smsq_http_body_timeout: float = Field(30.0, gt=0)
    smsq_http_max_connections: int = Field(1000, ge=10)
    smsq_access_log: bool = False
    # The SharedKey secret of a Twilio Webhook Setting that signs smsq's webhooks (with
    # HMAC-SHA256); those without one are signed with TWILIO_AUTH_TOKEN.
    smsq_webhook_shared_key: SecretStr | None = None

    smsq_log_format: Literal["text", "json"] = "text"
    smsq_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # AMQP names: the defaults are the public contract; tests point them at their own queues.
    smsq_exchange: str = Field("notifications", min_length=1)
    smsq_queue: str = Field("notifications.sms", min_length=1)
    smsq_routing_key: str = Field("sms", min_length=1)
    # Quorum queues (replicated, for a cluster) unless false: a classic queue lives on one node.
    smsq_quorum_queues: bool = True

    # Ingest batching: a batch is flushed at this many messages or after this many
    # milliseconds, whichever comes first, and at once when the queue runs dry. Batches are
    # stored side by side by SMSQ_INGEST_WRITERS threads, each with a connection of its own.
    # The prefetch is that many batches and two more unless set: one being gathered, one on
    # its way from the broker, one with each writer.
    smsq_ingest_batch_size: int = Field(1000, ge=1, le=50_000)
    smsq_ingest_batch_ms: int = Field(50, ge=1, le=60_000)
    smsq_ingest_writers: int = Field(3, ge=1, le=16)
    smsq_prefetch: int | None = Field(None, ge=1, le=65_535)

    # Extra From numbers; each recipient sticks to one of them (see consumer.ingest.senders).
    smsq_senders: str = ""

    # Dispatch: Twilio requests in flight at most (threads, and pooled connections), the
    # timeouts of one request, and the fallback poll when no notification wakes the loop.
    smsq_dispatch_concurrency: int = Field(64, ge=1, le=1000)
    smsq_twilio_connect_timeout: float = Field(5.0, gt=0)
    smsq_twilio_read_timeout: float = Field(10.0, gt=0)
    smsq_dispatch_poll_seconds: float = Field(5.0, gt=0)

    @field_validator("smsq_default_region")
    @classmethod
    def _known_region(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"not a region phonenumbers knows (e.g. US, GB, DE): {value!r}")
        return region

    @field_validator("twilio_phone_number")
    @classmethod
    def _e164_sender(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not is_sender_number(value):
            raise ValueError("must be a phone number in E.164 form, e.g. +15005550006")
        return value

    @field_validator("twilio_account_sid")
    @classmethod
    def _account_sid(cls, value: str | None) -> str | None:
        return _sid(value, "AC", "an Account SID")

    @field_validator("twilio_messaging_service_sid")
    @classmethod
    def _messaging_service_sid(cls, value: str | None) -> str | None:
        return _sid(value, "MG", "a Messaging Service SID")

    @field_validator("twilio_auth_token", "smsq_webhook_shared_key")
    @classmethod
    def _token_without_blanks(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (not value.get_secret_value()
                                  or _BLANK.search(value.get_secret_value())):
            raise ValueError("must not be empty or contain spaces")
        return value

    @field_validator("smsq_dashboard_password")
    @classmethod
    def _password_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # A passphrase may hold spaces; only blanks alone mean a mistake.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("smsq_dashboard_user")
    @classmethod
    def _basic_auth_user(cls, value: str | None) -> str | None:
        # HTTP Basic auth splits "user:password" at the first colon.
        if value is not None and (not value or ":" in value or _BLANK.search(value)):
            raise ValueError("must be a non-empty name without ':' or spaces")
        return value

    @field_validator("smsq_http_host", "smsq_metrics_host")
    @classmethod
    def _host_name(cls, value: str) -> str:
        if not _HOST.fullmatch(value):
            raise ValueError("must be an IP address or a host name, e.g. 127.0.0.1 or 0.0.0.0")
        return value

    @field_validator("smsq_exchange", "smsq_queue", "smsq_routing_key")
    @classmethod
    def _amqp_name(cls, value: str) -> str:
        if len(value.encode()) > 255 or _BLANK.search(value):
            raise ValueError("must be at most 255 bytes, without spaces")
        if value.startswith("amq."):
            raise ValueError("names starting with 'amq.' are reserved by RabbitMQ")
        return value

    @field_validator("smsq_senders")
    @classmethod
    def _sender_pool(cls, value: str) -> str:
        for entry in (s.strip() for s in value.split(",")):
            if entry and not (is_sender_number(entry) or _MESSAGING_SERVICE.fullmatch(entry)):
                raise ValueError("each comma-separated entry must be an E.164 phone number "
                                 "(+15005550006) or a Messaging Service SID (MG...); "
                                 f"got {entry!r}")
        return value

    @field_validator("smsq_trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",")):
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry)
            except ValueError:
                raise ValueError("each comma-separated entry must be an IP address or network "
                                 f"(127.0.0.1, 10.0.0.0/8) or *; got {entry!r}") from None
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        """One broker URL, or several separated by commas (the nodes of a cluster)."""
        entries = [entry.strip() for entry in value.split(",")]
        for number, entry in enumerate(entries, start=1):
            # The entry is named by its place, never echoed: it may hold a password.
            where = f"entry {number} of {len(entries)}: " if len(entries) > 1 else ""
            if problem := _amqp_url_problem(entry):
                raise ValueError(where + problem)
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> Settings:
        if self.smsq_retry_backoff_max < self.smsq_retry_backoff:
            raise ValueError("SMSQ_RETRY_BACKOFF_MAX must not be below SMSQ_RETRY_BACKOFF")
        return self

    @model_validator(mode="after")
    def _prefetch_of_batches(self) -> Settings:
        """Whichever of the two is set decides the other; both set must agree."""
        batches = self.smsq_ingest_writers + 2
        if self.smsq_prefetch is None:
            self.smsq_prefetch = min(batches * self.smsq_ingest_batch_size, 65_535)
        elif "smsq_ingest_batch_size" not in self.model_fields_set:
            self.smsq_ingest_batch_size = min(self.smsq_ingest_batch_size,
                                              max(1, self.smsq_prefetch // batches))
        elif self.smsq_prefetch < self.smsq_ingest_batch_size:
            raise ValueError("SMSQ_PREFETCH must be at least SMSQ_INGEST_BATCH_SIZE")
        return self

    @property
    def database_dsn(self) -> str:
        return with_connect_timeout(str(self.database_url))

    @property
    def amqp_urls(self) -> list[str]:
        return split_amqp_urls(self.amqp_url)

    @property
    def secure_cookies(self) -> bool:
        if self.smsq_secure_cookies is not None:
            return self.smsq_secure_cookies
        return self.smsq_public_url is not None and self.smsq_public_url.scheme == "https"

    @property
    def dead_queue(self) -> str:
        return f"{self.smsq_queue}.dead"

    @property
    def uses_twilio_sandbox(self) -> bool:
        return str(self.twilio_api_url).rstrip("/") != TWILIO_DEFAULT_API_URL

    @property
    def extra_senders(self) -> list[str]:
        return [s.strip() for s in self.smsq_senders.split(",") if s.strip()]


def load_settings(**overrides: object) -> Settings:
    """Build Settings, turning pydantic's report into one line that names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_config_error(exc)) from None


def describe_config_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    name = loc[0].upper() if loc else "configuration"
    message = first["msg"].removeprefix("Value error, ")
    # Never echo the value back: it may be a secret.
    return f"{name}: {message}"
