"""Typed settings, read once at the edge (CLI) from env, `.env` and an optional TOML file."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from eventsync.errors import ConfigError

ENV_PREFIX = "EVENTSYNC_"
_IPV6_FORM = "an IPv6 address goes in brackets, before the port: [::1]:8780"


def _check_postgres_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the PostgreSQL URL's port is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("the PostgreSQL URL's port is not a number from 1 to 65535")
    if not parts.path.strip("/"):
        raise ValueError(
            "the PostgreSQL URL names no database: postgresql://user:password@host:port/dbname"
        )
    if parts.fragment:
        raise ValueError("the PostgreSQL URL has a #fragment; percent-encode a '#' in a password")


class Settings(BaseSettings):
    """Every eventsync setting. Immutable once built."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    bookstack_url: AnyHttpUrl | None = None
    bookstack_token_id: str | None = None
    bookstack_token_secret: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    # Bearer token of the read endpoints (/changes, /access, /status): they carry content
    # and who may see it, so they need a key once they are reachable from other hosts.
    read_token: SecretStr | None = None
    # A SQLite file path, or postgresql://user:password@host:port/dbname (also postgres://).
    database: str = "./eventsync.db"
    # PostgreSQL only: the schema that holds every table, so the mirror can share a database.
    database_schema: str = Field("eventsync", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    listen: str = "127.0.0.1:8780"
    requests_per_minute: float = Field(150.0, gt=0, le=100_000)
    poll_interval: float = Field(30.0, gt=0)
    reconcile_interval: float = Field(3600.0, gt=0)
    sweep_share: float = Field(0.1, ge=0, le=1)
    # A sweep cycle starts at most this often; a full sync that read every role, shelf and
    # restricted item counts as one, so nothing is read twice in a row.
    sweep_interval: float = Field(3600.0, ge=0)
    # A webhook whose audit-log row has not appeared after this long means a gap.
    webhook_confirm_grace: float = Field(300.0, gt=0)
    # Down longer than this (no successful audit poll): diff-sync everything on start.
    max_downtime: float = Field(86400.0, gt=0)
    # On every poll, read each content listing's newest rows for what no event reports
    # (attachments, ownership migration, link rewrites): one request per kind and poll.
    probe: bool = True
    # Also keep attachment files (and link URLs): one read per new or changed attachment.
    attachment_content: bool = False
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Parallel detail fetches: the rate limiter sets the pace, this only hides latency.
    fetch_concurrency: int = Field(8, ge=1, le=64)
    http_timeout: float = Field(30.0, gt=0)
    # ---- outbound delivery (subscriptions, delivery.py) and the live stream ----
    # Loopback, private and link-local receivers are refused (server-side request forgery:
    # whoever may add a subscription could otherwise reach what only this host can).
    subscriptions_allow_private: bool = False
    # A subscription that has failed without a single 2xx for this long is paused.
    subscription_pause_after: float = Field(86400.0, gt=0)
    # One delivery attempt, connect to answer (the answer's body is read with a cap too).
    subscription_timeout: float = Field(10.0, gt=0, le=300)
    # The back-off between attempts doubles (with jitter) up to this. A minute: a receiver
    # that is back gets its backlog within a minute, and one attempt a minute costs a dead
    # one nothing.
    subscription_retry_max: float = Field(60.0, gt=0)
    # Changes in one delivery at most (fewer when they add up to more than 1 MiB).
    subscription_batch_size: int = Field(50, ge=1, le=1000)
    # /changes/stream sends a comment this often when there is nothing else to send, so that
    # proxies and load balancers keep the connection open.
    stream_heartbeat: float = Field(15.0, gt=0, le=3600)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if (
            not sep
            or not host
            or not (port.isascii() and port.isdigit())
            or not 0 <= int(port) < 65536
        ):
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8780 or [::1]:8780")
        # Whether the host resolves and the port is free, serve checks before it starts
        # (server.check_listen); what is wrong with the text itself is said here.
        if host.startswith("[") or host.endswith("]"):
            inner = host.removeprefix("[").removesuffix("]")
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError(_IPV6_FORM)
            try:
                ipaddress.IPv6Address(inner)
            except ValueError:
                raise ValueError(f"{inner} is not an IPv6 address") from None
        elif ":" in host:
            # "::1" or "::1:8780": which colon ends the address only brackets can say.
            raise ValueError(_IPV6_FORM)
        elif re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host} is not an IPv4 address") from None
        return value

    @field_validator("database", mode="before")
    @classmethod
    def _check_database(cls, value: Any) -> Any:
        # A URL is not a file name: a PostgreSQL URL would otherwise become a folder called
        # "postgresql:" with a SQLite file in it, and everything would seem to work.
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(text, str):
            raise ValueError("must be a SQLite file path or a postgresql:// URL")
        scheme, sep, _ = text.partition("://")
        if sep and scheme and scheme.replace("+", "").replace("-", "").isalnum():
            if scheme.lower() not in ("postgresql", "postgres"):
                raise ValueError(
                    f"{scheme}:// is not a supported database: give a SQLite file path or a "
                    "postgresql:// URL"
                )
            _check_postgres_url(text)
        elif not text.strip():
            raise ValueError("must be a SQLite file path or a postgresql:// URL, not empty")
        return text

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # The secret is the only thing protecting the endpoint (BookStack cannot sign).
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (it is the endpoint's only guard)")
        return value

    @field_validator("read_token")
    @classmethod
    def _check_read_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        if len(token) < 16:
            raise ValueError("must be at least 16 characters")
        if not token.isascii() or not token.isprintable() or " " in token:
            # It travels in an Authorization header: printable ASCII without spaces.
            raise ValueError("must be printable ASCII without spaces")
        return value

    @property
    def base_url(self) -> str:
        return str(self.bookstack_url).rstrip("/") if self.bookstack_url else ""

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def require(self, *names: str) -> None:
        """Fail with one line naming the first required setting that is missing."""
        for name in names:
            if getattr(self, name) in (None, ""):
                raise ConfigError(
                    f"setting {ENV_PREFIX}{name.upper()} is required "
                    "(set it in the environment, a .env file or the --config TOML file)"
                )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return (*sources, file_secret_settings)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; any problem becomes one ConfigError line naming the setting."""
    if config_file is not None and not config_file.is_file():
        if config_file.is_dir():
            raise ConfigError(f"config file {config_file} is a directory, not a TOML file")
        if config_file.exists():
            raise ConfigError(f"config file {config_file} is not a regular file")
        raise ConfigError(f"config file {config_file} does not exist")
    cls: type[Settings] = Settings
    if config_file is not None:
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        message = err["msg"].removeprefix("Value error, ")  # pydantic's, for our validators
        raise ConfigError(f"setting {ENV_PREFIX}{field.upper()} is invalid: {message}") from None
    except ValueError as exc:  # e.g. a TOML syntax error
        where = f" from {config_file}" if config_file is not None else ""
        raise ConfigError(f"cannot read settings{where}: {exc}") from None
    except OSError as exc:  # the TOML or .env file unreadable
        name = exc.filename or config_file or ".env"
        raise ConfigError(f"cannot read settings from {name}: {exc.strerror or exc}") from None
