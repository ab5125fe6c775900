"""Typed configuration from the environment and `.env`.

A wrong or missing value ends the process with exactly one line naming the variable
(`config error: RAM_BUFFER_BYTES: ...`), never a traceback.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, NoReturn, Self, get_args
from urllib.parse import quote, unquote, urlparse, urlsplit, urlunsplit

from pydantic import ByteSize, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tickbridge.core import keys

DEFAULT_SYMBOLS: tuple[str, ...] = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "TRXUSDT", "AVAXUSDT",
    "LINKUSDT", "DOTUSDT", "TONUSDT", "SHIBUSDT", "LTCUSDT", "BCHUSDT", "NEARUSDT", "UNIUSDT", "APTUSDT",
    "ICPUSDT", "ETCUSDT", "XLMUSDT", "FILUSDT", "ATOMUSDT", "ARBUSDT", "OPUSDT", "HBARUSDT", "INJUSDT",
    "SUIUSDT", "VETUSDT", "AAVEUSDT", "GRTUSDT", "RENDERUSDT", "ALGOUSDT", "SEIUSDT", "TIAUSDT", "STXUSDT",
    "IMXUSDT", "LDOUSDT", "RUNEUSDT", "EGLDUSDT", "SANDUSDT", "MANAUSDT", "AXSUSDT", "FLOWUSDT", "CHZUSDT",
    "PEPEUSDT", "WIFUSDT", "FETUSDT", "CRVUSDT", "ENAUSDT",
)  # fmt: skip

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
#: `keys.EXCHANGES` as a type (a wrong EXCHANGE is one config error line).
Exchange = Literal["binance_spot", "coinbase", "kraken"]

#: Default Prometheus port of each role when METRICS_PORT is not set.
DEFAULT_METRICS_PORTS: dict[str, int] = {
    "collector": 9101,
    "forwarder": 9102,
    "consumer": 9103,
    "writer": 9104,
    "sim": 9105,
    # `tickbridge forwarder` with FORWARDER_LANE=live: the fast-forward live lane as a process of its own.
    "forwarder-live": 9106,
}


#: `.env.example` marks every secret with this; such a value is never accepted (not even in a URL).
PLACEHOLDER_MARK = "change-me"
#: Secrets shorter than this are refused: a guessable password on an exposed port is no password. The
#: generated ones are far longer (`openssl rand -hex 24`: 48 characters; the native stack's: 32).
MIN_SECRET_CHARS = 16
_MAKE_ONE = "generate one with `openssl rand -hex 24`"


def secret_problem(value: str) -> str | None:
    """Why `value` cannot be a password (a `change-me-…` placeholder, or too short), else None."""
    if PLACEHOLDER_MARK in value.lower():
        return f"the {PLACEHOLDER_MARK}-... placeholder from .env.example is never accepted: {_MAKE_ONE}"
    if len(value) < MIN_SECRET_CHARS:
        return f"a password of {len(value)} characters is refused (at least {MIN_SECRET_CHARS}): {_MAKE_ONE}"
    return None


#: `*_FILE` setting -> the setting it supplies the password of (compose hands secrets over as files under
#: /run/secrets, so no password shows in `docker inspect`). A URL gets the password inserted after its user.
SECRET_FILES: dict[str, str] = {
    "vps_redis_password_file": "vps_redis_url",
    "brain_redis_password_file": "brain_redis_url",
    "questdb_password_file": "questdb_password",
    "questdb_reader_password_file": "questdb_reader_password",
}


def read_secret_file(path: str) -> str:
    """The secret held in the file `path` (one trailing newline dropped); ValueError saying why not.

    Refused: a missing or unreadable file, one any user may read or write (mode bits for "other": the
    secret would be everybody's on a native host), an empty or multi-line one, and a value that
    `secret_problem` refuses (placeholder, too short), exactly as for the variable itself.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"file {path!r} not found") from None
    except OSError as exc:
        raise ValueError(f"file {path!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path!r} is not a regular file")
    if info.st_mode & 0o007:
        raise ValueError(f"file {path!r} is open to every user (mode {stat.S_IMODE(info.st_mode):04o}): "
                         f"chmod o= it (0400, or 0440 for a group)")  # fmt: skip
    try:
        raw = Path(path).read_bytes()
    except PermissionError:
        raise ValueError(f"file {path!r} is not readable by uid {os.geteuid()} (owner uid {info.st_uid}): "
                         f"chown it to the user that runs this process") from None  # fmt: skip
    except OSError as exc:
        raise ValueError(f"file {path!r} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"file {path!r} is not UTF-8 text") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ValueError(f"file {path!r} is empty")
    if "\n" in value or "\r" in value:
        raise ValueError(f"file {path!r} holds more than one line (the password alone is expected)")
    problem = secret_problem(value)
    if problem is not None:
        raise ValueError(f"file {path!r}: {problem}")
    return value


def url_with_password(url: str, password: str) -> str:
    """`redis://user@host/0` + password -> `redis://user:password@host/0` (the password URL-quoted)."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if at else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hostport}"))


def _check_url(value: str, schemes: tuple[str, ...]) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in schemes or not parsed.hostname:
        raise ValueError(f"expected a {'/'.join(schemes)} URL with a host, got {value!r}")
    if PLACEHOLDER_MARK in unquote(value).lower():
        raise ValueError(f"holds a {PLACEHOLDER_MARK}-... placeholder from .env.example: replace it, got {value!r}")
    if parsed.password:
        problem = secret_problem(unquote(parsed.password))
        if problem is not None:
            raise ValueError(f"its password: {problem}")
    return value


@dataclass(frozen=True)
class ReadBy:
    """`Annotated` marker on a setting: the `tickbridge` commands that read it (`tickbridge <command> --help`
    lists them, with their defaults and descriptions, from this class alone)."""

    commands: tuple[str, ...]


#: Command groups of `ReadBy`. SERVICES are the long-running processes (they log and serve /metrics).
SERVICES = ("collector", "forwarder", "consumer", "writer", "sim")
VPS_REDIS = ("collector", "forwarder", "status")
BRAIN_REDIS = ("forwarder", "consumer", "writer", "query", "deadletters", "check", "status")
ANY_REDIS = (*VPS_REDIS, *BRAIN_REDIS)
#: Commands that log in to a QuestDB with QUESTDB_USER/QUESTDB_PASSWORD (full rights; `query` falls back to
#: it over HTTP when no reader login is set) and with the read-only reader login.
QUESTDB_LOGIN = ("forwarder", "writer", "query", "status")
QUESTDB_READER = ("query", "status")


class Settings(BaseSettings):
    """All tickbridge settings; each role reads the ones its `ReadBy` names."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True)

    binance_ws_url: Annotated[str, ReadBy(("collector",))] = Field(
        "wss://stream.binance.com:9443", description="exchange WebSocket base (the collector adds /stream?streams=...)"
    )
    binance_rest_url: Annotated[str, ReadBy(("collector",))] = Field(
        "https://api.binance.com", description="exchange REST base (depth snapshots, trade back-fill)"
    )
    exchange: Annotated[Exchange, ReadBy(("collector", "forwarder", "consumer", "status"))] = Field(
        "binance_spot",
        description="the exchange this process serves (binance_spot, coinbase, kraken): one collector, forwarder "
        "and consumer per exchange; its stream and state keys follow (STREAM_KEY unset: market:vps:stream for "
        "binance_spot, market:vps:stream:<exchange> otherwise)",
    )
    coinbase_ws_url: Annotated[str, ReadBy(("collector",))] = Field(
        "wss://advanced-trade-ws.coinbase.com", description="Coinbase Advanced Trade WebSocket (EXCHANGE=coinbase)"
    )
    coinbase_rest_url: Annotated[str, ReadBy(("collector",))] = Field(
        "https://api.exchange.coinbase.com", description="Coinbase Exchange REST (trade back-fill by ID)"
    )
    kraken_ws_url: Annotated[str, ReadBy(("collector",))] = Field(
        "wss://ws.kraken.com/v2", description="Kraken WebSocket v2 (EXCHANGE=kraken)"
    )
    kraken_rest_url: Annotated[str, ReadBy(("collector",))] = Field(
        "https://api.kraken.com", description="Kraken REST (trade back-fill by time)"
    )
    symbols: Annotated[tuple[str, ...], NoDecode, ReadBy((*SERVICES, "query", "deadletters", "status"))] = Field(
        DEFAULT_SYMBOLS, description="comma-separated pairs, e.g. BTCUSDT,ETHUSDT (at most 512)"
    )
    vps_redis_url: Annotated[str, ReadBy(VPS_REDIS)] = Field(
        "redis://localhost:6379/0", description="Redis on the VPS (rediss:// for TLS)"
    )
    brain_redis_url: Annotated[str, ReadBy(BRAIN_REDIS)] = Field(
        "redis://localhost:6380/0", description="Redis on the Brain (rediss:// for TLS)"
    )
    vps_questdb_url: Annotated[str, ReadBy(("forwarder", "status"))] = Field(
        "http://localhost:9000", description="QuestDB HTTP on the VPS (the spill buffer)"
    )
    brain_questdb_url: Annotated[str, ReadBy(("writer", "query", "status"))] = Field(
        "http://localhost:9010", description="QuestDB HTTP on the Brain (long-term tables)"
    )
    stream_key: Annotated[str, ReadBy(("collector", "forwarder", "consumer", "status"))] = Field(
        keys.DEFAULT_STREAM_KEY, min_length=1, description="the stream, same name on both hosts"
    )
    consumer_group: Annotated[str, ReadBy(("forwarder", "consumer", "status"))] = Field(
        keys.DEFAULT_CONSUMER_GROUP, min_length=1, description="the Brain's consumer group"
    )
    # Byte sizes take a unit (pydantic's ByteSize): 3GB = 3*10^9 (SI), 3GiB = 3*2^30; plain integers are bytes.
    ram_buffer_bytes: Annotated[ByteSize, ReadBy(("forwarder",))] = Field(
        ByteSize(3_000_000_000), gt=0, description="VPS backlog held in Redis before spilling to QuestDB"
    )
    disk_buffer_bytes: Annotated[ByteSize, ReadBy(("forwarder",))] = Field(
        ByteSize(40_000_000_000), gt=0, description="VPS QuestDB buffer budget; past it the oldest is dropped"
    )
    metrics_port: Annotated[int | None, ReadBy((*SERVICES, "check"))] = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port (unset: the role's default; 0: none)"
    )
    #: Loopback unless told otherwise: compose sets 0.0.0.0 (Prometheus scrapes over the container network).
    metrics_bind: Annotated[str, ReadBy(SERVICES)] = Field("127.0.0.1", description="address of /metrics")
    log_level: Annotated[LogLevel, ReadBy(SERVICES)] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR (any case)"
    )

    # Collector
    depth_snapshot_limit: Annotated[int, ReadBy(("collector",))] = Field(
        1000, ge=1, le=5000, description="order-book snapshot depth"
    )
    ws_max_lifetime_s: Annotated[float, ReadBy(("collector",))] = Field(
        23.5 * 3600, gt=0, description="reconnect the WebSocket after this long (Binance cuts at 24 h)"
    )
    ws_stale_timeout_s: Annotated[float, ReadBy(("collector",))] = Field(
        60.0, gt=0, description="reconnect a WebSocket silent this long"
    )
    hot_ticks: Annotated[int, ReadBy(("collector", "query"))] = Field(
        100, ge=1, description="HOT tier: last N ticks per symbol in memory"
    )
    warm_window_s: Annotated[float, ReadBy(("collector", "consumer", "deadletters"))] = Field(
        300.0, gt=0, description="WARM tier: seconds kept per symbol in Redis"
    )

    # Forwarder
    forward_batch: Annotated[int, ReadBy(("forwarder",))] = Field(
        5000, ge=1, le=100_000, description="entries per VPS -> Brain batch"
    )
    delivered_retention_s: Annotated[float, ReadBy(("forwarder",))] = Field(
        60.0, ge=0, description="seconds delivered entries stay in the VPS stream"
    )
    forwarder_lane: Annotated[Literal["both", "ordered", "live"], ReadBy(("forwarder",))] = Field(
        "both",
        description="both: one process replays the backlog and runs the fast-forward live lane; ordered / "
        "live: only that half, so kill -9 of the replaying process does not stop live data (run one of each)",
    )

    # Brain
    consumer_name: Annotated[str | None, ReadBy(("consumer", "writer", "check"))] = Field(
        None, description="instance name in the consumer group (unset: host name and pid)"
    )
    consumer_batch: Annotated[int, ReadBy(("consumer",))] = Field(
        1000, ge=1, le=100_000, description="entries per XREADGROUP"
    )
    consumer_claim_idle_ms: Annotated[int, ReadBy(("consumer",))] = Field(
        30_000, ge=1000, description="unused since the group is a cursor (issue 20); old configs still load"
    )
    consumer_max_deliveries: Annotated[int, ReadBy(("consumer",))] = Field(
        5, ge=1, description="deliveries before an entry an older consumer left pending becomes a dead letter"
    )
    writer_batch_rows: Annotated[int, ReadBy(("writer",))] = Field(
        10_000, ge=1, description="rows per QuestDB flush at most"
    )
    writer_flush_interval_s: Annotated[float, ReadBy(("writer",))] = Field(
        0.5,
        gt=0,
        description="least time between two flushes at 10,000 rows/s and more: QuestDB pays ~15 core-ms per "
        "transaction, so a heavy flow goes in few, big ones; below that rate the least time shrinks with the "
        "flow, down to WRITER_FLUSH_MIN_INTERVAL_S. A read that comes back short flushes once it has passed "
        "since the last flush (a trade after a quiet spell goes at once)",
    )
    writer_flush_min_interval_s: Annotated[float, ReadBy(("writer",))] = Field(
        0.1,
        gt=0,
        description="least time between two flushes at a light flow (2,000 rows/s or less with the defaults): "
        "a trade visible in QuestDB ~0.1 s after it arrived at 1,200/s, for ~0.2 of a core more QuestDB; "
        "equal to WRITER_FLUSH_INTERVAL_S gives one fixed interval",
    )

    # Security (issue 7): TLS material and QuestDB credentials, from the environment only.
    redis_tls_ca: Annotated[str | None, ReadBy(ANY_REDIS)] = Field(None, description="CA file for rediss:// URLs")
    redis_tls_cert: Annotated[str | None, ReadBy(ANY_REDIS)] = Field(None, description="client certificate file")
    redis_tls_key: Annotated[str | None, ReadBy(ANY_REDIS)] = Field(None, description="client key file")
    questdb_user: Annotated[str | None, ReadBy(QUESTDB_LOGIN)] = Field(None, description="QuestDB login (full rights)")
    questdb_password: Annotated[str | None, ReadBy(QUESTDB_LOGIN)] = Field(None, description="QUESTDB_USER's password")
    # Read-only QuestDB login of the readers (TieredMarketData, `tickbridge query`): QuestDB's PG-wire
    # read-only user (`pg.readonly.user`), which cannot DROP, INSERT, ALTER or CREATE.
    questdb_reader_user: Annotated[str | None, ReadBy(QUESTDB_READER)] = Field(
        None, description="read-only QuestDB login (PG wire)"
    )
    questdb_reader_password: Annotated[str | None, ReadBy(QUESTDB_READER)] = Field(
        None, description="QUESTDB_READER_USER's password"
    )
    brain_questdb_pg_url: Annotated[str, ReadBy(QUESTDB_READER)] = Field(
        "postgresql://localhost:8812/qdb", description="the Brain QuestDB's PG wire (reader login)"
    )

    # Passwords from files (compose secrets): each supplies the setting SECRET_FILES names, which must then
    # hold none itself (VPS_REDIS_URL `redis://collector@redis:6379/0` + VPS_REDIS_PASSWORD_FILE). Declared
    # last: their check sees the settings they supply.
    vps_redis_password_file: Annotated[str | None, ReadBy(VPS_REDIS)] = Field(
        None, description="file holding the password of VPS_REDIS_URL's user"
    )
    brain_redis_password_file: Annotated[str | None, ReadBy(BRAIN_REDIS)] = Field(
        None, description="file holding the password of BRAIN_REDIS_URL's user"
    )
    questdb_password_file: Annotated[str | None, ReadBy(QUESTDB_LOGIN)] = Field(
        None, description="file holding QUESTDB_PASSWORD"
    )
    questdb_reader_password_file: Annotated[str | None, ReadBy(QUESTDB_READER)] = Field(
        None, description="file holding QUESTDB_READER_PASSWORD"
    )

    @field_validator("ram_buffer_bytes", "disk_buffer_bytes", mode="before")
    @classmethod
    def _short_byte_size(cls, value: object) -> object:
        # ByteSize turns a 309-digit number into float infinity and raises OverflowError (a traceback).
        if isinstance(value, str) and len(value.strip()) > 40:
            raise ValueError(f"expected a byte size like 3GB, 512MiB or 3000000000 ({len(value)} characters given)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        level = value.strip().upper()  # info, INFO, Info: one level
        if level not in get_args(LogLevel):
            raise ValueError(f"expected one of {', '.join(get_args(LogLevel))} (any case)")
        return level

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: object) -> object:
        if isinstance(value, str):
            value = [s.strip().upper() for s in value.split(",") if s.strip()]
        return value

    @field_validator("symbols")
    @classmethod
    def _check_symbols(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one symbol is required")
        for sym in value:
            if not sym.isascii() or not sym.isalnum() or not sym.isupper():
                raise ValueError(f"invalid symbol {sym!r} (expected upper-case letters/digits like BTCUSDT)")
        if len(set(value)) != len(value):
            raise ValueError("duplicate symbols")
        if len(value) > 512:
            raise ValueError("at most 512 symbols (two streams each, 1024 per connection)")
        return value

    @field_validator("binance_ws_url", "coinbase_ws_url", "kraken_ws_url")
    @classmethod
    def _check_ws(cls, value: str) -> str:
        return _check_url(value.rstrip("/"), ("ws", "wss"))

    @field_validator("binance_rest_url", "coinbase_rest_url", "kraken_rest_url", "vps_questdb_url", "brain_questdb_url")
    @classmethod
    def _check_http(cls, value: str) -> str:
        return _check_url(value.rstrip("/"), ("http", "https"))

    @field_validator("vps_redis_url", "brain_redis_url")
    @classmethod
    def _check_redis(cls, value: str) -> str:
        return _check_url(value, ("redis", "rediss"))

    @field_validator("brain_questdb_pg_url")
    @classmethod
    def _check_pg(cls, value: str) -> str:
        return _check_url(value, ("postgresql", "postgres"))

    @field_validator("questdb_user", "questdb_reader_user")
    @classmethod
    def _check_user(cls, value: str | None) -> str | None:
        if value is not None and PLACEHOLDER_MARK in value.lower():
            raise ValueError(f"the {PLACEHOLDER_MARK}-... placeholder from .env.example is never accepted: "
                             f"choose a user name")  # fmt: skip
        return value

    @field_validator("questdb_password", "questdb_reader_password")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        if value:  # empty: not set (no QuestDB login)
            problem = secret_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator(*SECRET_FILES)
    @classmethod
    def _check_secret_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return None
        target = SECRET_FILES[str(info.field_name)]
        given = info.data.get(target)
        if target.endswith("_url") and given and urlparse(given).password:
            raise ValueError(f"{target.upper()} holds a password too: give it in one place (the URL without "
                             f"its password, with this file)")  # fmt: skip
        if not target.endswith("_url") and given:
            raise ValueError(f"{target.upper()} is set too: give the password in one place")
        read_secret_file(value)
        return value

    @model_validator(mode="after")
    def _stream_of_exchange(self) -> Self:
        # STREAM_KEY not given: the exchange's own stream (Binance keeps the contract's name).
        if "stream_key" not in self.model_fields_set:
            object.__setattr__(self, "stream_key", keys.stream_key_for(self.exchange))
        return self

    @model_validator(mode="after")
    def _apply_secret_files(self) -> Self:
        for file_field, target in SECRET_FILES.items():
            path = getattr(self, file_field)
            if path:
                secret = read_secret_file(path)
                value = url_with_password(getattr(self, target), secret) if target.endswith("_url") else secret
                object.__setattr__(self, target, value)  # frozen: set once, while validating
        return self

    def metrics_port_for(self, role: str) -> int:
        """METRICS_PORT if set, else the role's default port."""
        return self.metrics_port if self.metrics_port is not None else DEFAULT_METRICS_PORTS.get(role, 9100)


@dataclass(frozen=True)
class EnvVar:
    """One environment variable of a command, as `tickbridge <command> --help` shows it."""

    name: str
    default: str
    description: str


def _shown_default(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, ByteSize):
        return f"{int(value)} ({value.human_readable(decimal=True)})"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if len(value) <= 3 else f"{','.join(value[:3])},... ({len(value)})"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def variables_read_by(command: str) -> list[EnvVar]:
    """The environment variables `command` reads (its `ReadBy` marks), in declaration order, with defaults."""
    found = []
    for name, field in Settings.model_fields.items():
        marks = [m for m in field.metadata if isinstance(m, ReadBy)]
        if any(command in m.commands for m in marks):
            default = _shown_default(field.default)
            if name == "metrics_port" and command in DEFAULT_METRICS_PORTS:
                default = f"(unset: {DEFAULT_METRICS_PORTS[command]})"
            found.append(EnvVar(name.upper(), default, field.description or ""))
    return found


# `user:password@` after an optional `scheme://` (or a mistyped `scheme//`), up to the last `@`.
_URL_CREDENTIALS = re.compile(r"(?i)([a-z0-9+.-]*:?//)?[^\s'\"/]*@")
_SECRET_NAMES = ("PASSWORD", "SECRET", "TOKEN", "_KEY")


def redact_secrets(text: str) -> str:
    """`redis://user:pw@host` -> `redis://***@host`: config errors and logs never carry a password."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def config_error_line(exc: ValidationError) -> str:
    """One line naming the first offending variable (credentials in URLs and secret values redacted)."""
    err = exc.errors()[0]
    name = str(err["loc"][0]).upper() if err["loc"] else "CONFIG"
    value = err.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" (got {redact_secrets(str(value))[:60]!r})"
    if any(part in name for part in _SECRET_NAMES):
        shown = ""
    return redact_secrets(f"config error: {name}: {err['msg']}{shown}")


def die(line: str, code: int = 2) -> NoReturn:
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)


def tls_file_error(settings: Settings) -> str | None:
    """One line naming a TLS variable whose file a `rediss://` connection would fail on, else None.

    Checked when a process starts (not in the model, which also describes other hosts' containers): a
    missing file would otherwise show up as an endless "connection failed, retrying" loop.
    """
    if not any(url.startswith("rediss://") for url in (settings.vps_redis_url, settings.brain_redis_url)):
        return None
    files = {"REDIS_TLS_CA": settings.redis_tls_ca, "REDIS_TLS_CERT": settings.redis_tls_cert,
             "REDIS_TLS_KEY": settings.redis_tls_key}  # fmt: skip
    for name, value in files.items():
        if value and not os.access(value, os.R_OK):
            return f"config error: {name}: file not found or not readable (got {value[:60]!r})"
    if bool(settings.redis_tls_cert) != bool(settings.redis_tls_key):
        return "config error: REDIS_TLS_KEY: REDIS_TLS_CERT and REDIS_TLS_KEY go together (client certificate)"
    return None


def load_settings() -> Settings:
    """Load settings or exit with one line naming the variable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        die(config_error_line(exc))
    error = tls_file_error(settings)
    if error is not None:
        die(error)
    return settings
