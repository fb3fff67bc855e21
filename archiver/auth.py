"""Who may do what: the admin token, per-camera ingest tokens, and viewer sessions opened by
proof of possession of the viewer's token.

Secrets are compared in constant time, and stored only as SHA-256 digests (the admin token file
is the one exception: it is how the admin gets the token, mode 0600).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

MAX_PENDING_CHALLENGES = 10_000


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(given: str, expected_digest: bytes) -> bool:
    # Compare digests in constant time: the timing reveals nothing about the stored value.
    return hmac.compare_digest(digest(given), expected_digest)


def ensure_admin_token(path: Path) -> tuple[str, bool]:
    """The admin token, created (mode 0600) on first start. Returns (token, created)."""
    if path.exists():
        return path.read_text().strip(), False
    token = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, True


@dataclass(frozen=True)
class _Challenge:
    fingerprint: str
    secret: bytes
    context: bytes
    expires_ms: int


@dataclass(frozen=True)
class Session:
    fingerprint: str
    expires_ms: int


class Sessions:
    """Pending login challenges (single use) and viewer sessions, in memory: a restart logs
    every viewer out, which is the safe direction."""

    def __init__(self, challenge_ttl_s: int, session_ttl_s: int) -> None:
        self._challenge_ttl_ms = challenge_ttl_s * 1000
        self._session_ttl_ms = session_ttl_s * 1000
        self._challenges: dict[bytes, _Challenge] = {}
        self._sessions: dict[bytes, Session] = {}
        self._lock = threading.Lock()

    def add_challenge(self, challenge_id: bytes, fingerprint: str, secret: bytes, context: bytes,
                      now_ms: int) -> None:
        with self._lock:
            self._purge(now_ms)
            if len(self._challenges) >= MAX_PENDING_CHALLENGES:
                # Bounded: a flood of login attempts cannot exhaust memory.
                self._challenges.pop(next(iter(self._challenges)))
            self._challenges[challenge_id] = _Challenge(
                fingerprint, secret, context, now_ms + self._challenge_ttl_ms)

    def take_challenge(self, challenge_id: bytes, now_ms: int) -> _Challenge | None:
        """Single use: a replayed proof finds nothing."""
        with self._lock:
            challenge = self._challenges.pop(challenge_id, None)
        if challenge is None or challenge.expires_ms < now_ms:
            return None
        return challenge

    def open_session(self, fingerprint: str, now_ms: int) -> tuple[str, Session]:
        token = new_secret()
        session = Session(fingerprint, now_ms + self._session_ttl_ms)
        with self._lock:
            self._sessions[digest(token)] = session
        return token, session

    def session(self, token: str, now_ms: int) -> Session | None:
        with self._lock:
            session = self._sessions.get(digest(token))
            if session is not None and session.expires_ms < now_ms:
                del self._sessions[digest(token)]
                return None
            return session

    def end_sessions_of(self, fingerprint: str) -> None:
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s.fingerprint == fingerprint]:
                del self._sessions[key]

    def _purge(self, now_ms: int) -> None:
        for key in [k for k, c in self._challenges.items() if c.expires_ms < now_ms]:
            del self._challenges[key]
        for key in [k for k, s in self._sessions.items() if s.expires_ms < now_ms]:
            del self._sessions[key]
