"""Archiver settings: embedded defaults (SQLite + files + a SoftHSM token, all under one data
directory) that refuse insecure choices instead of silently accepting them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from keyservice.errors import UsageError

MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Key period: a fresh random key per data stream every period (a UTC minute in production).
    key_period_s: int = 60
    max_segment_bytes: int = 32 * MiB
    # A body that trickles in slower than this is dropped (slow-loris).
    upload_timeout_s: float = 60.0
    session_ttl_s: int = 600
    challenge_ttl_s: int = 60
    # The Archiver's own signing key. None: a SoftHSM token created in data_dir on first start.
    signer_token_uri: str | None = None
    signer_label: str = "archiver"
    # Viewer certificates must chain to one of these when given (a site CA).
    site_ca_files: tuple[Path, ...] = ()
    # A live viewer further behind than this many manifests is dropped, so it cannot pin resources.
    live_max_lag: int = 64
    # A fusion stream chunk the viewer does not take within this time ends its response: a
    # viewer that stops reading must not pin a task and open archive files indefinitely.
    stream_send_timeout_s: float = 30.0
    # URL schemes `cameras add --rtsp` may name. Not "file": an admin must not be able to make
    # the Archiver read its own files into an archive viewers can fetch.
    pull_schemes: tuple[str, ...] = ("rtsp", "rtsps")
    # Plaintext archiving, for the ingest benchmark's baseline only. Not settable from the CLI
    # or the HTTP API: only code constructing Settings can turn it on.
    benchmark_plaintext_baseline: bool = False

    def __post_init__(self) -> None:
        if self.key_period_s < 1:
            raise UsageError("The key period must be at least 1 second.")
        if self.upload_timeout_s <= 0 or self.stream_send_timeout_s <= 0 or self.session_ttl_s < 1:
            raise UsageError("The upload timeout, stream send timeout and session lifetime must "
                             "be positive.")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("Give both --tls-cert and --tls-key, or neither.")
        if self.tls_cert is None and not _is_loopback(self.host):
            # Fusion streams are encrypted end to end, but admin and camera bearer tokens and
            # plaintext camera uploads are not: refuse to expose them on a network in clear.
            raise UsageError(
                f"Refusing to listen on {self.host} without TLS.",
                "Give --tls-cert and --tls-key, or listen on 127.0.0.1 behind a TLS proxy.")

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def public_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "archiver.sqlite3"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def audit_log_path(self) -> Path:
        return self.data_dir / "audit.jsonl"

    @property
    def token_dir(self) -> Path:
        return self.data_dir / "token"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
