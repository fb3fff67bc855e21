"""Archiver settings: embedded defaults (SQLite + files + a SoftHSM token, all under one data
directory) that refuse insecure choices instead of silently accepting them."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from keyservice.errors import UsageError
from keyservice.names import CAMERA_NAME_RULE, is_camera_name

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
    # RTSP pull: a segment being built is cut at this many bytes or seconds (a camera that sends
    # no keyframe, or keyframes whose timestamps do not advance, cannot grow it without bound).
    rtsp_max_segment_bytes: int = 32 * MiB
    rtsp_max_segment_s: float = 20.0
    # A pushed camera's continuous stream may arrive this late and keep its stream's times
    # (archiver/cameras.py, rule 2); a segment later than this is placed at its arrival.
    max_behind_s: float = 30.0
    # RTSP pull: cameras are pulled and remuxed in this many worker processes (None: one per
    # core; 0: in the Archiver's own process, whose GIL holds it to about one core).
    rtsp_workers: int | None = None
    # Pulled (RTSP) cameras this Archiver takes (0: no limit). Beyond what its cores can pull,
    # remux and encrypt, every camera falls behind; refusing the next one says so at once.
    # 96: archived cleanly at 1 Mbit/s on the 2-core reference machine (issue 23).
    max_rtsp_cameras: int = 250
    # A body that trickles in slower than this is dropped (slow-loris).
    upload_timeout_s: float = 60.0
    # Request line and headers must arrive within this; JSON bodies within body_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    # Open connections (and requests in progress) beyond this are answered 503 at once.
    max_connections: int = 1000
    # Per client address: logins a second (and burst); per viewer: requests being searched
    # (until their answer starts), open streams, requests a second (and burst). Behind a proxy
    # every client has the proxy's address.
    login_rate: float = 5.0
    login_burst: int = 50
    viewer_concurrency: int = 4
    viewer_streams: int = 32
    viewer_rate: float = 20.0
    viewer_burst: int = 40
    # Refused requests are audited per client address per window (see archiver/limits.py).
    refusal_window_s: float = 60.0
    # /metrics answers only with the admin or the metrics token unless this is on.
    public_metrics: bool = False
    # /docs, /redoc and /openapi.json (the map of the API) only when this is on.
    api_docs: bool = False
    session_ttl_s: int = 600
    challenge_ttl_s: int = 60
    # The bootstrap admin token (data_dir/admin-token): the embedded default. A site whose admins
    # are people (archiver/admins.py) turns it off, so no shared credential acts as admin.
    bootstrap_token: bool = True
    # The Archiver's own signing key. None: a SoftHSM token created in data_dir on first start.
    signer_token_uri: str | None = None
    signer_label: str = "archiver"
    # A certificate a site CA issued for the signing key (PEM), used instead of the token's
    # self-signed one: evidence verifiers can then establish the signer with --site-ca.
    signing_cert_file: Path | None = None
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
    # Retention (docs/retention.md): video older than this many days is destroyed (its keys
    # first), unless an evidence hold covers it; a camera may have its own period.
    retention_days: int = 30
    # How often the retention task looks for expired video and checks the free space.
    retention_interval_s: float = 60.0
    # Below this much free space on the archive's file system the oldest unheld video goes,
    # whatever its age, so that ingest goes on.
    min_free_bytes: int = 1024 * MiB
    # Space set aside (a file in the data directory) that retention gives back when the disk
    # is full, so that its own index transaction can run and free more. Made at start only
    # where the file system has four times as much free, again after an eviction (twice).
    reserve_bytes: int = 16 * MiB
    # Plaintext archiving, for the ingest benchmark's baseline only. Not settable from the CLI
    # or the HTTP API: only code constructing Settings can turn it on.
    benchmark_plaintext_baseline: bool = False
    # The site directory (archiver/directory/): None, the SQLite file in data_dir (a standalone
    # Archiver); a postgresql:// URL makes this Archiver a member of a site. Not in repr: it
    # may carry a password.
    directory_url: str | None = field(default=None, repr=False)
    # This Archiver's name in its site (the registry's key, the audit log's and the camera
    # placements' "archiver"): the host name unless given; two Archivers on one host need
    # their own. The URL the site's viewers reach it at: this listener's unless given (behind
    # a proxy or a DNS name, give it).
    archiver_name: str = field(default_factory=socket.gethostname)
    advertised_url: str | None = None
    # In a site: authorization changes made through other Archivers arrive by PostgreSQL
    # LISTEN/NOTIFY (off: polling alone), and the directory is polled this often anyway, so a
    # lost notification (or a lost connection) still converges (archiver/directory/notify.py).
    site_notify: bool = True
    site_poll_s: float = 5.0
    # Consolidation (archiver/consolidation.py): the CA that verifies the other Archivers' TLS
    # when this one copies their recordings (None: FUSION_TLS_CA, else the system's), and how
    # often it looks for gaps other Archivers recorded in the cameras it holds (0: never; the
    # admin command `consolidate` still works).
    peer_tls_ca: Path | None = None
    consolidate_every_s: float = 600.0

    def __post_init__(self) -> None:
        if self.key_period_s < 1:
            raise UsageError("The key period must be at least 1 second.")
        if min(self.upload_timeout_s, self.stream_send_timeout_s, self.session_ttl_s,
               self.header_timeout_s, self.body_timeout_s, self.refusal_window_s) <= 0:
            raise UsageError("The timeouts, the session lifetime and the audit window must be "
                             "positive.")
        if min(self.login_rate, self.login_burst, self.viewer_concurrency, self.viewer_streams,
               self.viewer_rate, self.viewer_burst, self.max_connections) <= 0:
            raise UsageError("The login and viewer limits must be positive.")
        if self.retention_days < 1 or self.retention_interval_s <= 0 or self.min_free_bytes < 0 \
                or self.reserve_bytes < 0:
            raise UsageError("The retention period must be at least 1 day, its interval "
                             "positive, and the free-space threshold not negative.")
        if self.rtsp_max_segment_bytes < 64 * 1024 or self.rtsp_max_segment_s <= 0:
            raise UsageError("The RTSP segment cap must be at least 64 KiB and its time "
                             "positive.")
        if not 0 < self.max_behind_s <= 120:
            raise UsageError("--max-behind-s must be more than 0 and at most 120 seconds.")
        if self.rtsp_workers is not None and not 0 <= self.rtsp_workers <= 256:
            raise UsageError("The number of RTSP worker processes must be from 0 to 256.")
        if self.max_rtsp_cameras < 0:
            raise UsageError("--max-rtsp-cameras must be 0 (no limit) or more.")
        if self.consolidate_every_s < 0:
            raise UsageError("--consolidate-every must be 0 (never) or more seconds.")
        if not 0.1 <= self.site_poll_s <= 3600:
            raise UsageError("--site-poll must be from 0.1 to 3600 seconds.")
        # An Archiver's name follows the camera-name rule: it stands in URLs and logs alike.
        if not is_camera_name(self.archiver_name):
            raise UsageError(f"The Archiver name {self.archiver_name!r} is not usable.",
                             f"Give --name of {CAMERA_NAME_RULE}.")
        if self.advertised_url is not None and not re.fullmatch(
                r"https?://[^\s/?#]+/?", self.advertised_url):
            raise UsageError(f"--public-url {self.advertised_url!r} is not a URL.",
                             "Give the scheme, host and port only: https://a1.site.example:8443.")
        if self.directory_url:
            from archiver.directory.engine import check_url
            check_url(self.directory_url)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("Give both --tls-cert and --tls-key, or neither.")
        if self.tls_cert is None and not _is_loopback(self.host):
            # Fusion streams are encrypted end to end, but admin and camera bearer tokens and
            # plaintext camera uploads are not: refuse to expose them on a network in clear.
            raise UsageError(
                f"Refusing to listen on {self.host} without TLS.",
                "Give --tls-cert and --tls-key, or listen on 127.0.0.1 behind a TLS proxy.")

    @property
    def rtsp_worker_count(self) -> int:
        """Worker processes pulling RTSP cameras (0: pulled in-process)."""
        if self.rtsp_workers is None:
            return os.cpu_count() or 1
        return self.rtsp_workers

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def public_url(self) -> str:
        """The URL viewers and cameras reach this Archiver at."""
        if self.advertised_url:
            return self.advertised_url.rstrip("/")
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
    def metrics_token_path(self) -> Path:
        return self.data_dir / "metrics-token"

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
