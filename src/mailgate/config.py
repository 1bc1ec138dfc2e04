"""One typed settings object, built once at the edge and passed down.

Every setting has a type, a default, an environment variable (``MAILGATE_<NAME>``) and
a description; ``mailgate config show`` prints the effective values with secrets
masked. Precedence, strongest first: explicit overrides (CLI flags), environment,
TOML file given with ``--config``, defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mailgate.errors import ConfigError


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:25`` for IPv6) into its parts.

    Raises:
        ConfigError: the value is not ``host:port`` with a port in 0..65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


BLOCKED_EXTENSIONS = ("bat", "cmd", "com", "exe", "js", "jse", "msi", "ps1", "scr", "vbs", "wsf")


class Settings(BaseSettings):
    """The gateway's configuration. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(env_prefix="MAILGATE_", extra="forbid", frozen=True)

    data_dir: Path = Field(
        Path(".mailgate"), description="Folder for the SQLite database and the blob store."
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL. Empty means sqlite:///<data_dir>/mailgate.db. "
        "PostgreSQL: postgresql+psycopg://user:pass@host/db.",
    )
    blob_dir: Path | None = Field(
        None, description="Content-addressed blob folder; empty means <data_dir>/blobs."
    )
    blob_inline_max: int = Field(
        128 * 1024,
        ge=0,
        description="Blobs up to this many bytes are stored in the database, committed "
        "with their message; larger ones are files in blob_dir. 0 keeps every blob a file.",
    )
    http_listen: str = Field("127.0.0.1:8025", description="HTTP API address, host:port.")
    smtp_listen: str = Field("127.0.0.1:2525", description="SMTP ingress address, host:port.")
    agent_domain: str = Field(
        "agents.localhost", description="Domain of addresses given to new agents."
    )
    smtp_hostname: str = Field(
        "mailgate.localhost", description="Name the SMTP server gives in its banner and EHLO."
    )
    max_message_size: int = Field(
        25 * 1024 * 1024,
        gt=0,
        description="Largest message accepted, in bytes; advertised as SMTP SIZE, "
        "refused with 552 / HTTP 413 beyond it.",
    )
    recipient_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long SMTP trusts a known agent address without asking the "
        "database again (unknown addresses are always looked up). 0 disables.",
    )
    smtp_max_recipients: int = Field(100, gt=0, description="RCPT TO accepted per transaction.")
    smtp_tls_cert: Path | None = Field(None, description="PEM certificate; enables STARTTLS.")
    smtp_tls_key: Path | None = Field(None, description="PEM private key for smtp_tls_cert.")
    smtp_require_tls: bool = Field(False, description="Refuse MAIL FROM before STARTTLS.")
    smtp_timeout: float = Field(300.0, gt=0, description="Idle seconds before a client is cut.")
    ingest_batch_max: int = Field(
        64, gt=0, description="Most messages committed in one group commit (one fsync)."
    )
    max_header_bytes: int = Field(
        256 * 1024,
        gt=0,
        description="Headers longer than this are stored raw but not decoded (parser trap guard).",
    )
    max_mime_parts: int = Field(
        500, gt=0, description="MIME parts walked per message; the rest is recorded as a defect."
    )
    thread_window_days: float = Field(
        14.0, gt=0, description="How far back the subject+participants thread fallback looks."
    )
    feed_lease_seconds: float = Field(
        30.0, gt=0, description="Default lease when GET /v1/events gives none."
    )
    feed_max_lease_seconds: float = Field(
        3600.0, gt=0, description="Longest lease a consumer may ask for."
    )
    feed_max_wait_seconds: float = Field(
        30.0, ge=0, description="Longest long-poll a consumer may ask for."
    )
    feed_max_limit: int = Field(100, gt=0, description="Most events one pull may lease.")
    feed_max_deliveries: int = Field(
        5, gt=0, description="Deliveries before an event is dead-lettered for its consumer."
    )
    feed_poll_interval: float = Field(
        0.5, gt=0, description="Long-poll re-check interval (catches writes by other processes)."
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="How long SIGTERM waits for in-flight SMTP transactions."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    database_password: SecretStr | None = Field(
        None, description="Password merged into database_url (keeps it out of the URL)."
    )
    # -- sender authentication (SMTP ingress) ----------------------------------------
    sender_auth: bool = Field(
        True,
        description="Check SPF, DKIM, DMARC and ARC on SMTP mail and prepend an "
        "Authentication-Results header. Off: nothing is checked, rules see 'none'.",
    )
    authserv_id: str = Field(
        "",
        description="authserv-id of our Authentication-Results headers (incoming ones "
        "claiming it are removed). Empty means smtp_hostname.",
    )
    dns_nameservers: list[str] = Field(
        default_factory=list,
        description="Resolvers for sender authentication as ip or ip:port; empty means "
        "the system's (/etc/resolv.conf).",
    )
    dns_timeout_seconds: float = Field(
        2.0, gt=0, description="Timeout of one DNS query made by sender authentication."
    )
    sender_auth_budget_seconds: float = Field(
        5.0,
        gt=0,
        description="DNS time one message's sender authentication may spend in all; "
        "past it the remaining checks are temperror and the message is still accepted.",
    )
    # -- provider webhooks (each endpoint is off until its secret is set) -------------
    inbound_max_body_bytes: int = Field(
        0,
        ge=0,
        description="Largest webhook request body, in bytes; refused with 413 before it "
        "is read whole. 0 means max_message_size * 1.4 + 64 KiB (base64 and form "
        "overhead); the message built from it must still fit max_message_size.",
    )
    inbound_sendgrid_secret: SecretStr | None = Field(
        None,
        description="Enables POST /inbound/sendgrid: give it as the last path segment "
        "(/inbound/sendgrid/<secret>) or as the basic-auth password.",
    )
    inbound_sendgrid_user: str = Field(
        "sendgrid", description="Basic-auth user name expected with inbound_sendgrid_secret."
    )
    inbound_mailgun_signing_key: SecretStr | None = Field(
        None, description="Enables POST /inbound/mailgun: the Mailgun HTTP webhook signing key."
    )
    inbound_mailgun_max_age_seconds: float = Field(
        9 * 3600.0,
        gt=0,
        description="Mailgun timestamps further than this from now are refused. Mailgun "
        "retries a failed post for 8 hours, possibly with its first signature, so the "
        "window covers that; replays inside it are caught by the signed token, "
        "remembered (webhook_receipt_days) with the body it came with.",
    )
    inbound_postmark_user: str = Field(
        "postmark", description="Basic-auth user name for POST /inbound/postmark."
    )
    inbound_postmark_password: SecretStr | None = Field(
        None, description="Enables POST /inbound/postmark: its basic-auth password."
    )
    inbound_raw_token: SecretStr | None = Field(
        None, description="Enables POST /inbound/raw: the bearer token callers present."
    )
    webhook_receipt_days: float = Field(
        4.0,
        gt=0,
        description="How long a provider event id is remembered for de-duplication "
        "(longer than any provider retries: SendGrid 3 days, Mailgun 8 h).",
    )
    # -- mailbox ----------------------------------------------------------------------
    trash_retention_days: float = Field(
        30.0,
        gt=0,
        description="Trashed messages are purged this long after they were trashed, "
        "with blobs no other message uses.",
    )
    retention_interval_seconds: float = Field(
        3600.0, gt=0, description="How often serve runs the retention job."
    )

    # -- outbound -----------------------------------------------------------------------
    default_tier: Literal["reply_only", "known_contacts", "allowlisted_domains", "open"] = Field(
        "reply_only",
        description="Outbound tier of new agents: reply_only (replies in threads that "
        "have inbound mail), known_contacts, allowlisted_domains, open.",
    )
    idempotency_ttl_hours: float = Field(
        24.0, ge=24.0, description="How long an Idempotency-Key and its response are kept."
    )
    idempotency_lock_seconds: float = Field(
        60.0,
        gt=0,
        description="An in-flight Idempotency-Key older than this belongs to a crashed "
        "request and may be taken over by a retry.",
    )
    approval_expiry_hours: float = Field(
        72.0, gt=0, description="Held outbound mail not approved or rejected by then expires."
    )
    approval_webhook_url: str = Field(
        "",
        description="Also POST outbound.pending_approval to this URL (owners are "
        "always emailed at their addresses). Empty: no webhook.",
    )
    rate_per_hour: int = Field(100, gt=0, description="Outbound messages per agent per hour.")
    rate_per_day: int = Field(1000, gt=0, description="Outbound messages per agent per day.")
    rate_per_domain_hour: int = Field(
        30, gt=0, description="Outbound recipients per agent per recipient domain per hour."
    )
    loop_thread_cap: int = Field(
        5,
        gt=0,
        description="Loop guard: most replies an agent sends in one thread within "
        "loop_window_minutes.",
    )
    loop_window_minutes: float = Field(60.0, gt=0, description="Loop guard window.")
    outbound_auto_submitted: bool = Field(
        True,
        description="Mark agent replies 'Auto-Submitted: auto-replied' (RFC 3834), so "
        "other automata, including agents on this gateway, do not answer them. Off, only "
        "the per-thread cap stops two agents mailing each other.",
    )
    outbound_max_bytes: int = Field(
        10 * 1024 * 1024, gt=0, description="Largest outbound message, in bytes."
    )
    outbound_blocked_extensions: list[str] = Field(
        default_factory=lambda: list(BLOCKED_EXTENSIONS),
        description="Attachment file extensions refused on outbound mail.",
    )
    complaint_threshold: float = Field(
        0.01,
        gt=0,
        le=1,
        description="A complaint rate (complaints / delivered, 30 days) above this "
        "drops the agent one tier (audited).",
    )
    complaint_min_sample: int = Field(
        20, gt=0, description="Messages sent before the complaint rate is acted on."
    )
    transport: Literal["capture", "smtp", "sendgrid"] = Field(
        "capture",
        description="How outbound mail leaves: capture (stored for inspection, sent "
        "nowhere), smtp (a relay), sendgrid (v3 mail send API).",
    )
    relay_host: str = Field("127.0.0.1", description="SMTP relay host (transport=smtp).")
    relay_port: int = Field(587, gt=0, le=65535, description="SMTP relay port.")
    relay_username: str = Field("", description="SMTP relay AUTH user; empty: no AUTH.")
    relay_password: SecretStr | None = Field(None, description="SMTP relay AUTH password.")
    relay_starttls: Literal["auto", "require", "off"] = Field(
        "auto",
        description="STARTTLS to the relay: auto (when offered), require, off.",
    )
    relay_tls: bool = Field(False, description="Implicit TLS (port 465 style) to the relay.")
    relay_ca_file: Path | None = Field(
        None, description="CA bundle to verify the relay's certificate; empty: system CAs."
    )
    relay_timeout_seconds: float = Field(60.0, gt=0, description="SMTP relay timeout.")
    sendgrid_api_key: SecretStr | None = Field(None, description="SendGrid API key.")
    sendgrid_api_url: str = Field("https://api.sendgrid.com", description="SendGrid API base URL.")
    sendgrid_event_public_key: str = Field(
        "",
        description="Enables POST /feedback/sendgrid: the Event Webhook's ECDSA public "
        "key (base64 DER, as SendGrid shows it).",
    )
    sendgrid_event_max_age_seconds: float = Field(
        600.0, gt=0, description="Event Webhook timestamps older than this are refused."
    )
    delivery_workers: int = Field(
        4, ge=0, description="Concurrent deliveries in this process (0: no delivery worker)."
    )
    delivery_lease_seconds: float = Field(
        120.0,
        gt=0,
        description="How long a worker owns a claimed delivery; a crashed worker's "
        "delivery is retried after it.",
    )
    delivery_max_attempts: int = Field(
        8, gt=0, description="Attempts before a temporarily failing delivery fails for good."
    )
    retry_base_seconds: float = Field(
        30.0, gt=0, description="First retry delay; doubles per attempt, with full jitter."
    )
    retry_max_seconds: float = Field(3600.0, gt=0, description="Longest retry delay.")
    delivery_poll_seconds: float = Field(
        1.0, gt=0, description="How often an idle delivery worker looks for work."
    )

    # -- agent surfaces (/v0, push, extraction) -----------------------------------------
    public_url: str = Field(
        "",
        description="Base URL clients reach the HTTP API at, for links the gateway hands "
        "out (attachment downloads). Empty: http://<http_listen>.",
    )
    url_signing_secret: SecretStr | None = Field(
        None,
        description="HMAC key for time-limited download links. Empty: a random key kept "
        "in <data_dir>/url-signing.key (set one shared value when running several nodes).",
    )
    download_url_ttl_seconds: float = Field(
        3600.0, gt=0, description="How long an attachment download link stays valid."
    )
    extract_max_chars: int = Field(
        20_000,
        gt=0,
        description="Most characters of extracted text (message or attachment) one "
        "response carries; longer text is cut and flagged `truncated`.",
    )
    extract_max_attachment_bytes: int = Field(
        10 * 1024 * 1024,
        gt=0,
        description="Attachments larger than this are described by type only, not read.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="How long one push webhook POST may take."
    )
    webhook_retry_base_seconds: float = Field(
        5.0, gt=0, description="First push retry delay; doubles per attempt, with jitter."
    )
    webhook_retry_max_seconds: float = Field(3600.0, gt=0, description="Longest push retry delay.")
    webhook_allow_private_targets: bool = Field(
        False,
        description="Allow webhook URLs on loopback/private addresses (tests, single-host "
        "setups). Off by default so a webhook cannot probe the gateway's own network.",
    )
    websocket_poll_seconds: float = Field(
        1.0,
        gt=0,
        description="How often a websocket looks for events written by other processes.",
    )
    v0_max_attachment_bytes: int = Field(
        25 * 1024 * 1024,
        gt=0,
        description="Largest attachment a /v0 send or draft may upload (413 above).",
    )

    @field_validator("http_listen", "smtp_listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.smtp_tls_cert is None) != (self.smtp_tls_key is None):
            raise ValueError("smtp_tls_cert and smtp_tls_key must be given together")
        return self

    @property
    def effective_public_url(self) -> str:
        """The base URL for links handed to clients, without a trailing slash."""
        return (self.public_url or f"http://{self.http_listen}").rstrip("/")

    @property
    def effective_database_url(self) -> str:
        """The database URL with defaults applied (and the password merged in)."""
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'mailgate.db').resolve()}"
        if self.database_password is None:
            return self.database_url
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url).set(password=self.database_password.get_secret_value())
        return url.render_as_string(hide_password=False)

    @property
    def effective_authserv_id(self) -> str:
        return self.authserv_id or self.smtp_hostname

    @property
    def effective_inbound_max_body(self) -> int:
        if self.inbound_max_body_bytes:
            return self.inbound_max_body_bytes
        return int(self.max_message_size * 1.4) + 64 * 1024

    @property
    def effective_blob_dir(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"

    @property
    def http_address(self) -> tuple[str, int]:
        return parse_listen(self.http_listen)

    @property
    def smtp_address(self) -> tuple[str, int]:
        return parse_listen(self.smtp_listen)

    def masked(self) -> dict[str, Any]:
        """Effective settings for display: passwords and secrets replaced by ``***``."""
        from sqlalchemy.engine import make_url

        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***"
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        out["database_url"] = make_url(self.effective_database_url).render_as_string(
            hide_password=True
        )
        out["blob_dir"] = str(self.effective_blob_dir)
        return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, an optional TOML file, the environment and
    explicit overrides (strongest).

    Raises:
        ConfigError: the file is missing or a value is invalid.
    """
    from pydantic import ValidationError

    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if config_file is None:
            return Settings(**overrides)
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        toml_path = config_file

        class FileSettings(Settings):
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (
                    init_settings,
                    env_settings,
                    TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
                )

        return FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc
