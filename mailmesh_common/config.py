"""Typed settings from MAILMESH_* environment variables and an optional TOML file.

Precedence: defaults < TOML file (MAILMESH_CONFIG or an explicit path) < environment. Every
bad key or value raises ConfigError naming the key, never a traceback deep inside a service.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailmesh_common import address
from mailmesh_common.errors import ConfigError, InvalidInput

ENV_PREFIX = "MAILMESH_"


@dataclass(frozen=True)
class Settings:
    """Every tunable of mailmesh. Env var: MAILMESH_<FIELD IN UPPER CASE>; TOML key: the field."""

    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    # gRPC ports (each service serves health and reflection on its own)
    mailbox_port: int = 50051
    search_port: int = 50052
    send_port: int = 50053
    ingest_port: int = 50054
    gateway_port: int = 50055
    # protocol ports
    smtp_port: int = 2525
    submission_port: int = 5870
    http_port: int = 8080
    imap_port: int = 1143
    # NATS
    nats_port: int = 4222
    nats_url: str = ""  # default nats://{host}:{nats_port}
    stream_replicas: int = 1  # JetStream replicas of INBOUND/EVENTS/OUTBOUND (3 on a cluster)
    # where services find each other (default {host}:{port})
    mailbox_addr: str = ""
    search_addr: str = ""
    send_addr: str = ""
    # state
    kv_path: str = ""  # default {data_dir}/mailbox.db
    fdb_cluster_file: str = ""
    blob_url: str = ""  # "" = files under {data_dir}/blobs; s3://bucket[/prefix] = S3-compatible store
    s3_endpoint_url: str = ""  # S3 API endpoint for MinIO / Ceph RGW / R2 ("" = AWS)
    s3_region: str = ""  # S3 region ("" = from the AWS configuration)
    meili_url: str = ""
    meili_api_key: str = ""
    # security
    internal_token: str = ""  # default: read from / written to {data_dir}/internal.token
    # limits
    max_message_bytes: int = 25 * 1024 * 1024
    default_quota_bytes: int = 10 * 1024 * 1024 * 1024
    grpc_default_deadline_s: float = 30.0
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    changelog_retention: int = 100_000
    # unreferenced blobs are removed this long after their last reference went away
    blob_gc_grace_s: float = 86_400.0
    # logs
    log_level: str = "INFO"
    log_format: str = "json"
    # DNS
    dns_servers: tuple[str, ...] = ()
    # telemetry: also write finished spans as JSON lines here (debugging, tests)
    trace_file: str = ""
    # svc_ingest
    smtp_hostname: str = ""  # name in the greeting, EHLO and Received; default: this host's name
    # svc_ingest processes `mailmesh up` runs, sharing the SMTP and gRPC ports (SO_REUSEPORT);
    # 0: one per core, at most MAX_AUTO_INGEST_WORKERS (ingest is CPU-bound)
    ingest_workers: int = 0
    # svc_ingest lowers its CPU priority by this much (nice, 0..19) when it starts: on a machine
    # it shares with svc_mailbox, accepted mail is delivered before more is accepted (the 250
    # came once it was durable; the sender only waits a little longer for the next one)
    ingest_nice: int = 5
    tls_cert_file: str = ""  # PEM certificate (chain) for STARTTLS; default: self-signed, generated
    tls_key_file: str = ""  # PEM private key for tls_cert_file
    max_recipients: int = 100  # RCPT TO per message; more get 452 4.5.3
    max_received_headers: int = 50  # more Received headers is a loop: 554 5.4.6
    # concurrent SMTP sessions of one svc_ingest process, all clients together (memory and file
    # descriptors); more get 421 4.3.2 and the sender retries later; 0 = unlimited
    smtp_max_connections: int = 1000
    per_ip_max_connections: int = 20  # concurrent SMTP connections per client IP; 0 = unlimited
    per_ip_messages_per_minute: int = 120  # MAIL transactions per client IP per minute; 0 = unlimited
    # idle time before an SMTP session is closed; during DATA it restarts with every read while the
    # DATA averages at least 500 bytes/s beyond it (smtpserver.MIN_DATA_RATE)
    smtp_timeout_s: float = 300.0
    # 4xx/5xx replies one SMTP session may get without a message accepted; past it: 421 4.7.0
    # and the connection is closed (address probing, broken clients); 0 = unlimited
    smtp_max_errors: int = 20
    # DNS blocklists of client addresses (RFC 5782), e.g. zen.spamhaus.org: a listed client's
    # RCPT gets 554 5.7.1 (postmaster@ and abuse@ excepted); a list that does not answer blocks nothing
    dnsbl_zones: tuple[str, ...] = ()
    clamd_address: str = ""  # clamd socket: a unix socket path or host:port; "" = no virus scanning
    clamd_required: bool = True  # clamd unreachable: 451 4.7.0 (true) or deliver unscanned, logged (false)
    clamd_timeout_s: float = 30.0
    spam_threshold: float = 5.0  # spam score at or over which mail goes to SPAM
    authserv_id: str = ""  # Authentication-Results authserv-id; default: smtp_hostname
    # the account that receives mail for postmaster@ and abuse@ of every local domain where no
    # account or alias has that address (RFC 5321 4.5.1, RFC 2142), and for a bare <postmaster>
    postmaster: str = ""
    # svc_send
    undo_send_s: float = 10.0  # hold before delivery starts; CancelSend works inside it
    sends_per_day: int = 500  # messages one user may send per UTC day; more: RESOURCE_EXHAUSTED
    max_recipients_per_message: int = 100  # To + Cc + Bcc of one message; more: INVALID_ARGUMENT
    # wait after the 1st, 2nd... temporary failure (seconds); the last one repeats
    outbound_retry_schedule_s: tuple[str, ...] = ("0", "300", "1800", "7200", "28800", "86400")
    outbound_max_age_s: float = 5 * 86400.0  # still failing this long after queueing: bounce
    outbound_smtp_port: int = 25  # port of remote mail servers (tests point it at a local sink)
    outbound_per_destination: int = 4  # concurrent connections to one recipient domain
    outbound_workers: int = 64  # concurrent deliveries per svc_send process
    outbound_connect_timeout_s: float = 30.0
    outbound_command_timeout_s: float = 300.0  # RFC 5321 4.5.3.2: 5 min per command
    outbound_ack_wait_s: float = 60.0  # a delivery worker that dies is taken over after this long
    submission_tls_cert_file: str = ""  # PEM for submission STARTTLS; default tls_cert_file, else self-signed
    submission_tls_key_file: str = ""  # PEM private key for submission_tls_cert_file
    submission_auth_require_tls: bool = True  # AUTH only after STARTTLS...
    submission_auth_loopback_plaintext: bool = True  # ...except from loopback addresses (dev)
    submissions_port: int = 0  # submission over implicit TLS (RFC 8314; production 465); 0 = off
    # concurrent submission sessions of one svc_send process (421 4.3.2 past it), and of one client
    # IP (an IPv6 client by its /64; 421 4.7.0 past it); 0 = unlimited
    submission_max_connections: int = 500
    submission_per_ip_max_connections: int = 50
    # svc_gateway
    gateway_token_ttl_s: float = 86_400.0  # lifetime of a REST bearer token
    gateway_requests_per_minute: int = 1000  # REST requests per user per minute; 0 = unlimited
    gateway_searches_per_minute: int = 100  # REST searches (q=) per user per minute; 0 = unlimited
    gateway_login_failures_per_account: int = 10  # failed logins per account per 15 min; more: 429
    gateway_login_failures_per_ip: int = 50  # failed logins per client IP per 15 min; more: 429
    gateway_max_request_bytes: int = 36 * 1024 * 1024  # REST request body limit (413 beyond)
    gateway_cors_origins: tuple[str, ...] = ()  # allowed CORS origins ("*" for any); empty: no CORS
    gateway_ws_max_sockets_per_user: int = 10  # WebSocket /v1/events connections per user per gateway
    gateway_ws_send_queue: int = 1000  # events queued for one socket; more: the slow client is closed (4408)
    gateway_ws_send_timeout_s: float = 10.0  # a frame not taken by the client in this long: closed (4408)
    gateway_ws_heartbeat_s: float = 25.0  # heartbeat frame after this much quiet; the token is re-checked too
    extra: Mapping[str, str] = field(default_factory=dict)

    # --- derived -------------------------------------------------------------------------
    def resolved_nats_url(self) -> str:
        return self.nats_url or f"nats://{self.host}:{self.nats_port}"

    def addr(self, service: str) -> str:
        explicit = getattr(self, f"{service}_addr", "")
        if explicit:
            return str(explicit)
        return f"{self.host}:{getattr(self, f'{service}_port')}"

    def resolved_kv_path(self) -> str:
        return self.kv_path or str(self.data_dir / "mailbox.db")

    def token(self) -> str:
        """The mesh's internal token: explicit, or shared through the data dir."""
        if self.internal_token:
            return self.internal_token
        path = self.data_dir / "internal.token"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tok = secrets.token_urlsafe(32)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tok)
            try:
                os.link(tmp, path)  # first writer wins; others read its token
            except FileExistsError:
                pass
            tmp.unlink(missing_ok=True)
            return path.read_text().strip()


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "extra"}


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    try:
        if typ is int:
            if isinstance(raw, bool):
                raise ValueError
            value = int(raw)
            if key.lower().endswith("_port") and not 0 <= value <= 65535:
                raise ValueError
            if value < 0:
                raise ValueError
            return value
        if typ is float:
            fvalue = float(raw)
            if fvalue < 0:
                raise ValueError
            return fvalue
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            low = str(raw).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is Path:
            if not isinstance(raw, (str, os.PathLike)):
                raise ValueError
            return Path(raw)
        if typ is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError
            return str(raw)
        if origin is tuple:
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            if isinstance(raw, list) and all(isinstance(p, str) for p in raw):
                return tuple(raw)
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{key}: unsupported type")  # pragma: no cover
    kind = {int: "a non-negative integer" + (" in 0..65535" if key.lower().endswith("_port") else ""),
            float: "a non-negative number", bool: "true or false", Path: "a path", str: "a string"}
    expected = kind.get(typ, "a comma-separated list" if origin is tuple else str(typ))
    raise ConfigError(f"{key}: expected {expected}, got {raw!r}")


_HINTS = typing.get_type_hints(Settings)


def load_settings(config_file: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Builds Settings; raises ConfigError naming the offending key."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"MAILMESH_CONFIG: file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
        table = data.get("mailmesh", data)
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: [mailmesh] must be a table")
        for key, raw in table.items():
            if key not in _FIELDS:
                raise ConfigError(f"{p}: unknown key {key!r}")
            values[key] = _coerce(f"{p}: {key}", raw, _HINTS[key])
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in _FIELDS:
            continue  # other tools' MAILMESH_* variables (e.g. test knobs) are not ours to reject
        values[key] = _coerce(name, raw, _HINTS[key])
    for key, raw in overrides.items():
        if raw is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, raw, _HINTS[key])
    level = str(values.get("log_level", "INFO")).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    values["log_level"] = level
    if values.get("log_format", "json") not in ("json", "text"):
        raise ConfigError(f"log_format: expected json or text, got {values['log_format']!r}")
    if not 0 <= int(values.get("ingest_nice", 0)) <= 19:
        raise ConfigError(f"ingest_nice: expected 0..19, got {values['ingest_nice']!r}")
    postmaster = str(values.get("postmaster", "")).strip()
    if postmaster:
        try:
            values["postmaster"] = address.canonical(postmaster)
        except InvalidInput as exc:
            raise ConfigError(f"postmaster: {exc.message}") from None
    return Settings(**values)


MAX_AUTO_INGEST_WORKERS = 8


def ingest_processes(settings: Settings) -> int:
    """How many svc_ingest processes `mailmesh up` runs: ingest_workers, or with 0 one per core
    (at most MAX_AUTO_INGEST_WORKERS)."""
    if settings.ingest_workers > 0:
        return settings.ingest_workers
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_INGEST_WORKERS))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces `settings` in a child process."""
    out: dict[str, str] = {}
    for name in _FIELDS:
        value = getattr(settings, name)
        if isinstance(value, tuple):
            value = ",".join(value)
        out[ENV_PREFIX + name.upper()] = str(value)
    return out


__all__ = ["ConfigError", "Settings", "ingest_processes", "load_settings", "settings_env"]
