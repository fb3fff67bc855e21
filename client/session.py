"""The viewer's HTTP side: proof-of-possession login and the requests of the viewer API.

Login: the viewer posts its certificate; the Archiver answers with a challenge RSA-encrypted to
it; the token decrypts it (one token operation) and the viewer returns a MAC keyed by the
decrypted secret over (Archiver, viewer, challenge) -- the secret itself never leaves the host.
The Archiver's certificate in the challenge is checked against the pin *before* the token is
used, so an impersonator gets nothing from the token.

Every failure becomes a KeyServiceError subclass with one sentence and its own exit code.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.crypto.login import LoginChallenge, answer_login_challenge, login_context
from keyservice.errors import (  # the HTTP errors are shared with fusion-archiver
    ArchiverFailed,
    ArchiverUnreachable,
    CertificateError,
    FormatError,
    KeyServiceError,
    RequestRefused,
    StreamTruncated,
    UsageError,
)
from keyservice.exitcodes import ExitCode
from keyservice.exits import unreachable
from keyservice.format import Mode
from keyservice.identity import Identity, fingerprint
from keyservice.records import FrozenRecord
from keyservice.request_policy import DEFAULT_MAX_SKEW_MS, StreamRequest
from keyservice.tls import trust as tls_trust
from keyservice.wire import ErrorCode

if TYPE_CHECKING:
    from cryptography import x509

    from client.answers import CameraView, GrantBlob, GrantInfo, SiteArchiver

# Answers a stream's start does not read live in client.answers, imported on first use (their
# classes cost play's start; issue 23): still importable from here.
_ANSWERS = frozenset({"CameraView", "GrantBlob", "GrantInfo", "SiteArchiver"})


def __getattr__(name: str) -> Any:
    if name in _ANSWERS:
        from client import answers

        return getattr(answers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# The answers of client.answers are documented there (still importable from here).
__all__ = ["ERROR_CLASSES", "MAX_LIVE_S", "MEDIA_TYPE", "ArchiverSession", "GrantNotUsable",
           "HeldElsewhere", "LoginRefused", "LoginResult", "NoRecording", "NotAuthorized",
           "NotEnrolled", "OutsideGrant", "PlacementView", "RangeSpansArchivers",
           "RecordingExpired", "UnknownCamera", "UnknownGrant", "ViewerRevoked", "live_request",
           "local_clock_ms", "playback_request"]

MEDIA_TYPE = "application/vnd.fusion-stream"
# The Archiver's /live allows at most a day per request.
MAX_LIVE_S = 86_400


# --- errors (exit codes documented in docs/client.md) -------------------------------------
class NotEnrolled(RequestRefused):
    """This viewer's certificate is not enrolled on the Archiver."""

    exit_code = ExitCode.NOT_ENROLLED


class ViewerRevoked(RequestRefused):
    """This viewer's certificate has been revoked."""

    exit_code = ExitCode.VIEWER_REVOKED


class NotAuthorized(RequestRefused):
    """Not authorized on this camera (or no such camera: the Archiver says the same)."""

    exit_code = ExitCode.NOT_AUTHORIZED


class UnknownCamera(RequestRefused):
    """No such camera (older Archivers only)."""

    exit_code = ExitCode.UNKNOWN_CAMERA


class NoRecording(RequestRefused):
    """No recording in the requested range."""

    exit_code = ExitCode.NO_RECORDING


class RecordingExpired(NoRecording):
    """The range's video was removed by the Archiver's retention (its keys destroyed), as a
    statement signed by the pinned Archiver shows (session.recording checks it; a 410 without
    a valid one is keyservice.expiry.ExpiryUnproven, exit 59)."""

    exit_code = ExitCode.RECORDING_EXPIRED
    signed: object = None  # the 410 body's "expiry" member, as received (unverified)


class LoginRefused(RequestRefused):
    """The login was refused (proof malformed or rejected), or the session expired."""

    exit_code = ExitCode.LOGIN_REFUSED


class GrantNotUsable(RequestRefused):
    """An access grant that is not (or no longer) approved: pending, rejected or revoked."""

    exit_code = ExitCode.GRANT_NOT_USABLE


class OutsideGrant(RequestRefused):
    """A request under an access grant goes outside the granted range."""

    exit_code = ExitCode.OUTSIDE_GRANT


class UnknownGrant(RequestRefused):
    """No such access grant for this viewer's certificate."""

    exit_code = ExitCode.UNKNOWN_GRANT


class HeldElsewhere(RequestRefused):
    """Another Archiver of the site holds the range: the Archiver's 307, not yet followed
    (client/site.py checks the target before it follows: never blindly)."""

    archiver: str = ""
    url: str = ""        # the holder's URL, as the body names it
    location: str = ""   # the Location header
    asked: str = ""      # the path and query that was asked (the redirect must keep them)


class RangeSpansArchivers(RequestRefused):
    """The range was recorded by several Archivers of the site: play each part from its own
    (``placements``: the Archiver's list, as received)."""

    placements: list[PlacementView] = []  # noqa: RUF012 (set per instance)


# The Archiver's error codes (keyservice.wire) that have an exit code of their own; any other
# refusal is RequestRefused (4xx) or ArchiverFailed (5xx).
ERROR_CLASSES: dict[ErrorCode, type[KeyServiceError]] = {
    ErrorCode.NOT_ENROLLED: NotEnrolled,
    ErrorCode.REVOKED: ViewerRevoked,
    ErrorCode.NOT_AUTHORIZED: NotAuthorized,
    ErrorCode.UNKNOWN_CAMERA: UnknownCamera,
    ErrorCode.NO_RECORDING: NoRecording,
    ErrorCode.EXPIRED: RecordingExpired,
    ErrorCode.BAD_PROOF: LoginRefused,
    ErrorCode.PROOF_REFUSED: LoginRefused,
    ErrorCode.SESSION_INVALID: LoginRefused,
    ErrorCode.UNAUTHENTICATED: LoginRefused,
    ErrorCode.BAD_CERTIFICATE: CertificateError,
    ErrorCode.CERTIFICATE_EXPIRED: CertificateError,
    ErrorCode.CERTIFICATE_NOT_YET_VALID: CertificateError,
    ErrorCode.BAD_RANGE: UsageError,
    ErrorCode.GRANT_PENDING: GrantNotUsable,
    ErrorCode.GRANT_REJECTED: GrantNotUsable,
    ErrorCode.GRANT_REVOKED: GrantNotUsable,
    ErrorCode.OUTSIDE_GRANT: OutsideGrant,
    ErrorCode.UNKNOWN_GRANT: UnknownGrant,
}


def local_clock_ms() -> int:
    """This machine's clock, in milliseconds (a live request's freshness is judged by it)."""
    return time.time_ns() // 1_000_000


def playback_request(camera: str, from_ms: int, to_ms: int) -> StreamRequest:
    """A recorded range, with a fresh random nonce the answer must repeat."""
    return StreamRequest(secrets.token_bytes(16), (camera,), Mode.PLAYBACK, from_ms, to_ms)


def live_request(camera: str, duration_s: float, clock: Callable[[], int] = local_clock_ms,
                 max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> StreamRequest:
    """Live from now (this machine's clock), with a fresh random nonce."""
    now = clock()
    return StreamRequest(secrets.token_bytes(16), (camera,), Mode.LIVE, now,
                         now + int(duration_s * 1000), clock, max_skew_ms)


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class PlacementView(FrozenRecord):
    """Who recorded a camera from ``since_ms`` until ``until_ms`` (None: still), and the URL
    the site's registry gives for it (None: not registered)."""

    archiver: str
    url: str | None
    since_ms: int
    until_ms: int | None
    # Every Archiver holding a copy of this range, with its URL, in the camera's order: more
    # than one for a redundant camera (issue 22); empty from an Archiver from before.
    copies: tuple[tuple[str, str | None], ...] = ()
    # The Archiver asked holds that recording too, consolidated as its Archiver signed it
    # (issue 22, item 4): played there, verified against that Archiver's certificate.
    copy_here: bool = False

    @classmethod
    def from_json(cls, body: Any) -> PlacementView:
        """From the Archiver's JSON; ArchiverFailed if it is not a placement."""
        try:
            copies = tuple((str(c["archiver"]), _optional_str(c.get("url")))
                           for c in body.get("copies") or ())
            return cls(str(body["archiver"]), _optional_str(body.get("url")),
                       int(body["since_ms"]), _optional_int(body.get("until_ms")), copies,
                       body.get("copy_here") is True)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ArchiverFailed("The Archiver's placement of a camera is malformed.") from None


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _check_request(request: StreamRequest, mode: Mode, camera: str, from_ms: int | None = None,
                   to_ms: int | None = None) -> None:
    """The fetch sends what the request says, so the Player's check of the answer is the
    check of what was asked: never a request for one thing with a nonce bound to another."""
    if not isinstance(request, StreamRequest):
        raise TypeError("A fetch needs its StreamRequest (playback_request/live_request).")
    if request.mode != mode or request.cameras != (camera,) or (
            from_ms is not None and (request.from_ms, request.to_ms) != (from_ms, to_ms)):
        raise UsageError("The request given does not describe this fetch (camera, mode or "
                         "range differ).")


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class LoginResult(FrozenRecord):
    """A login: the Archiver's certificate (pinned), the viewer's fingerprint as the Archiver
    knows it, and when the session expires."""

    archiver_certificate: x509.Certificate
    archiver_fingerprint: bytes
    viewer_fingerprint: str
    expires_ms: int


class ArchiverSession:
    """One viewer's conversation with one Archiver (a context manager)."""

    def __init__(self, url: str, *, tls_ca: Path | None = None,
                 trust: ssl.SSLContext | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        """``trust``: the SSL context to verify the Archiver with; without it, the one
        keyservice.tls builds from ``tls_ca`` (else FUSION_TLS_CA, else the system's CAs)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"The Archiver URL {url!r} is not an http:// or https:// URL.")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.trust = trust if trust is not None else tls_trust(tls_ca)
        try:
            self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=self.trust,
                                      transport=transport, follow_redirects=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"Cannot use the Archiver URL {url!r}: {exc}.") from None
        self._session_token: str | None = None
        self.login_result: LoginResult | None = None
        self._streaming: set[httpx.Response] = set()  # streams being read (interrupt() ends them)
        self._interrupted = False

    def sibling(self) -> ArchiverSession:
        """A connection of its own to the same Archiver, with the same trust and the same
        login (no new proof of possession): a stream on it can be stopped from another thread
        (``interrupt``) without touching this session."""
        child = ArchiverSession(self.url, trust=self.trust, timeout=self.timeout)
        child._session_token = self._session_token
        child.login_result = self.login_result
        return child

    def __enter__(self) -> ArchiverSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def interrupt(self) -> None:
        """From another thread: end the streams being read on this session (and any opened
        after), so that the reading thread returns and closes the session itself.

        Their sockets are shut down, not closed. A blocked read holds its socket open, so
        closing alone tells the Archiver nothing (a silent camera's live stream, and one of the
        viewer's stream slots there, would stay until its next segment). And closing it under
        the reading thread frees its descriptor number while that thread's TLS object still
        reads and writes the number: the next connection the process opens gets it, and the
        two connections' bytes mix (seen in the browser grid as a tile's TLS handshake failing
        with WRONG_VERSION_NUMBER, or its stream cut mid-way)."""
        self._interrupted = True
        for response in list(self._streaming):
            _shut_down(response)

    def close(self) -> None:
        """Close the connection (the Archiver's session stays valid until it expires). From
        the thread that uses it; another thread calls ``interrupt``."""
        self.interrupt()
        self._http.close()

    # --- plumbing ---------------------------------------------------------------------
    def _unreachable(self, exc: httpx.HTTPError) -> ArchiverUnreachable:
        return unreachable(self.url, exc)

    def _redirect(self, response: httpx.Response) -> KeyServiceError:
        """A 3xx is never followed here: a 307 naming the holder of the range becomes
        HeldElsewhere (client/site.py decides whether to follow), anything else an error."""
        try:
            body = response.json()
        except ValueError:
            body = None
        location = response.headers.get("location", "")
        if (response.status_code == 307 and isinstance(body, dict)
                and body.get("error") == ErrorCode.HELD_ELSEWHERE
                and isinstance(body.get("archiver"), str) and isinstance(body.get("url"), str)):
            error = HeldElsewhere(str(body.get("message") or "Another Archiver holds the range."))
            error.archiver, error.url, error.location = body["archiver"], body["url"], location
            asked = response.request.url
            error.asked = asked.raw_path.decode("ascii", "replace")
        else:
            error = RequestRefused(f"The Archiver at {self.url} answered HTTP "
                                   f"{response.status_code} (a redirect to {location or 'nowhere'}"
                                   "), which a viewer does not follow.")
        error.wire_code = ErrorCode.HELD_ELSEWHERE if isinstance(error, HeldElsewhere) else None
        error.http_status = response.status_code
        return error

    def _error(self, response: httpx.Response) -> KeyServiceError:
        if 300 <= response.status_code < 400:
            return self._redirect(response)
        code, message = None, None
        try:
            body = response.json()
            code, message = body.get("error"), body.get("message")
        except (ValueError, AttributeError):
            pass
        if not isinstance(message, str) or not message:
            message = f"The Archiver answered HTTP {response.status_code} " \
                      f"{response.reason_phrase}."
        error: KeyServiceError
        if isinstance(code, str) and code in ERROR_CLASSES:
            error = ERROR_CLASSES[ErrorCode(code)](message)
            if isinstance(error, RecordingExpired):
                error.signed = body.get("expiry")
        elif code == ErrorCode.RANGE_SPANS_ARCHIVERS and isinstance(body.get("placements"),
                                                                   list):
            error = RangeSpansArchivers(message)
            error.placements = [PlacementView.from_json(p) for p in body["placements"]]
        elif response.status_code >= 500:
            error = ArchiverFailed(f"{message} (HTTP {response.status_code})")
        else:
            error = RequestRefused(f"{message} (HTTP {response.status_code})")
        # What the Archiver said, kept for a program that handles the error (not only a person).
        error.wire_code = code if isinstance(code, str) else None
        error.http_status = response.status_code
        return error

    def _headers(self) -> dict[str, str]:
        if self._session_token is None:
            raise LoginRefused("Not logged in to the Archiver.")
        return {"Authorization": f"Bearer {self._session_token}"}

    def _json(self, method: str, path: str, body: Any = None, auth: bool = False) -> Any:
        try:
            response = self._http.request(method, path, json=body,
                                          headers=self._headers() if auth else None)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 300:
            raise self._error(response)
        try:
            return response.json()
        except ValueError:
            raise ArchiverFailed(f"The Archiver's answer to {path} is not JSON; is {self.url} "
                                 "really a Fusion Archiver?") from None

    # --- login ------------------------------------------------------------------------
    def login(self, identity: Identity,
              check_archiver: Callable[[x509.Certificate], object]) -> LoginResult:
        """Prove possession of the token; ``check_archiver`` raises if the Archiver's
        certificate is not the pinned one (it runs before the token is touched)."""
        pem = identity.certificate.public_bytes(Encoding.PEM).decode()
        challenge = LoginChallenge.from_answer(
            self._json("POST", "/v1/sessions/challenge", {"certificate": pem}))
        archiver_cert, challenge_id = challenge.archiver_certificate, challenge.challenge_id
        check_archiver(archiver_cert)
        archiver_fp = fingerprint(archiver_cert)
        context = login_context(archiver_fp, fingerprint(identity.certificate), challenge_id)
        # The only token operation of the login; answer_login_challenge refuses (IntegrityError)
        # any plaintext that is not a login challenge, so the token is no decryption oracle.
        proof = answer_login_challenge(identity, challenge.ciphertext, challenge.key_scheme,
                                       context)
        opened = self._json("POST", "/v1/sessions", {
            "challenge_id": challenge_id.hex(), "proof": base64.b64encode(proof).decode()})
        try:
            self._session_token = str(opened["session_token"])
            result = LoginResult(archiver_cert, archiver_fp, str(opened["fingerprint"]),
                                 int(opened["expires_ms"]))
        except (KeyError, TypeError, ValueError):
            raise ArchiverFailed("The Archiver's session answer is malformed.") from None
        self.login_result = result
        return result

    # --- viewer API -------------------------------------------------------------------
    def cameras(self) -> list[CameraView]:
        """The cameras this viewer may watch, with their recorded ranges."""
        from client.answers import CameraView

        rows = self._json("GET", "/v1/cameras", auth=True)
        try:
            return [CameraView(str(r["name"]), r["first_ms"], r["last_ms"], int(r["segments"]),
                               str(r.get("state", "unknown")),
                               _optional_str(r.get("archiver"))) for r in rows]
        except (KeyError, TypeError, ValueError):
            raise ArchiverFailed("The Archiver's camera list is malformed.") from None

    def placements(self, camera: str, from_ms: int | None = None,
                   to_ms: int | None = None) -> list[PlacementView] | None:
        """Which Archivers of the site recorded ``camera`` in [from_ms, to_ms], oldest first
        (None: an Archiver from before sites, which holds all of its cameras itself)."""
        return self.placements_and_name(camera, from_ms, to_ms)[0]

    def placements_and_name(self, camera: str, from_ms: int | None = None,
                            to_ms: int | None = None
                            ) -> tuple[list[PlacementView] | None, str | None]:
        """``placements`` and the name of the Archiver that answered, which the answer carries
        (None when it does not: ask ``name``): one round trip for both (issue 23: start-up)."""
        query = "&".join(f"{k}={v}" for k, v in (("from_ms", from_ms), ("to_ms", to_ms))
                         if v is not None)
        return self._placements(f"/v1/cameras/{camera}/placements?{query}", "a camera")

    def grant_placements(self, grant_id: str) -> list[PlacementView] | None:
        """Which Archivers of the site recorded the range of an approved grant to this viewer,
        oldest first (None: an Archiver from before sites, or before this endpoint)."""
        return self._placements(f"/v1/grants/{grant_id}/placements", "a grant")[0]

    def _placements(self, path: str, of: str
                    ) -> tuple[list[PlacementView] | None, str | None]:
        try:
            body = self._json("GET", path, auth=True)
        except RequestRefused as exc:
            # An Archiver without the endpoint (404 from the framework, no wire code of ours).
            if getattr(exc, "http_status", None) == 404 and exc.wire_code in (
                    None, ErrorCode.HTTP_ERROR):
                return None, None
            raise
        if not isinstance(body, dict) or not isinstance(body.get("placements"), list):
            raise ArchiverFailed(f"The Archiver's placements of {of} are malformed.")
        # "archiver": the answering Archiver's name, as GET /v1/archiver gives it (same
        # connection, same trust: unsigned either way).
        name = body.get("archiver")
        return ([PlacementView.from_json(p) for p in body["placements"]],
                name if isinstance(name, str) else None)

    def name(self) -> str | None:
        """This Archiver's name in its site (None: an Archiver from before sites)."""
        try:
            body = self._json("GET", "/v1/archiver")
        except RequestRefused:
            return None
        name = body.get("name") if isinstance(body, dict) else None
        return name if isinstance(name, str) else None

    def site_archivers(self) -> list[SiteArchiver]:
        """The site's Archivers (the registry) as this Archiver lists them ([] before sites)."""
        try:
            rows = self._json("GET", "/v1/site/archivers", auth=True)
        except RequestRefused as exc:
            if getattr(exc, "http_status", None) == 404:
                return []
            raise
        from cryptography import x509  # the registry's certificates, read in full

        from client.answers import SiteArchiver

        try:
            return [SiteArchiver(str(r["name"]), str(r["url"]).rstrip("/"),
                                 str(r["fingerprint"]),
                                 x509.load_pem_x509_certificate(str(r["certificate"]).encode()))
                    for r in rows]
        except (KeyError, TypeError, ValueError):
            raise ArchiverFailed("The Archiver's list of the site's Archivers is malformed."
                                 ) from None

    def gaps(self, camera: str, from_ms: int, to_ms: int) -> list[tuple[int, int]]:
        """Stretches of [from, to] with no recorded video, from the Archiver's index (unsigned:
        for display; a fusion stream's signed segment times are what is verified)."""
        body = self._json("GET", f"/v1/cameras/{camera}/gaps?from_ms={from_ms}&to_ms={to_ms}",
                          auth=True)
        try:
            return [(int(g["from_ms"]), int(g["to_ms"])) for g in body["gaps"]]
        except (KeyError, TypeError, ValueError):
            raise ArchiverFailed("The Archiver's gap list is malformed.") from None

    @contextmanager
    def recording(self, camera: str, from_ms: int, to_ms: int, request: StreamRequest,
                  copy_of: str | None = None) -> Iterator[Iterator[bytes]]:
        """The fusion stream of a recorded range, as an iterator of received chunks.
        ``request`` (playback_request(camera, from_ms, to_ms)) carries the nonce sent; give the
        same one to the Player, which then checks that the stream answers it."""
        _check_request(request, Mode.PLAYBACK, camera, from_ms, to_ms)
        nonce = request.nonce
        entered = False
        try:
            params = {"from_ms": from_ms, "to_ms": to_ms, "nonce": nonce.hex()}
            if copy_of is not None:  # another Archiver's recording consolidated here
                params["copy_of"] = copy_of
            with self._stream(f"/v1/cameras/{camera}/recording", params,
                              read_timeout=self.timeout) as it:
                entered = True
                yield it
        except RecordingExpired as exc:
            if entered:
                raise
            error = self._signed_expiry(exc, camera, from_ms, to_ms, nonce)
            error.wire_code, error.http_status = exc.wire_code, exc.http_status
            raise error from None

    def _signed_expiry(self, exc: RecordingExpired, camera: str, from_ms: int, to_ms: int,
                       nonce: bytes) -> KeyServiceError:
        """A 410 is believed only with a statement the pinned Archiver signed for this very
        request; otherwise the range is withheld (ExpiryUnproven), not expired."""
        from client.timespec import format_ms
        from keyservice.expiry import ExpiryUnproven, verify_statement
        if self.login_result is None:
            return ExpiryUnproven("The Archiver answered 'expired' before a login; the claim "
                                  "cannot be checked.")
        try:
            statement = verify_statement(exc.signed, self.login_result.archiver_certificate,
                                         camera=camera, from_ms=from_ms, to_ms=to_ms,
                                         nonce=nonce)
        except ExpiryUnproven as unproven:
            return ExpiryUnproven(f"WITHHELD: the Archiver says the range expired, but "
                                  f"{str(unproven)[0].lower()}{str(unproven)[1:]} Treat the "
                                  "range as withheld, not as removed by retention.")
        stretches = "; ".join(
            f"{format_ms(e.from_ms)} .. {format_ms(e.to_ms)} by {e.reason}"
            + (f" ({e.retention_days} days)" if e.retention_days is not None else "")
            + f", removed {format_ms(e.removed_ms)}" for e in statement.expired[:5])
        return RecordingExpired(f"{exc} Expired (signed by the Archiver): {stretches}.")

    # --- access grants of past video (client/grants.py) -----------------------------------
    def create_grant(self, blob: bytes, note: str | None) -> GrantInfo:
        """Hand a grant (opaque: minute keys wrapped to the grantee) to the Archiver; it is
        served only once an admin approves it."""
        from client.answers import GrantInfo

        return GrantInfo.from_json(self._json(
            "POST", "/v1/grants", {"grant": base64.b64encode(blob).decode(), "note": note},
            auth=True))

    def grants(self) -> list[GrantInfo]:
        """The grants this viewer made or received, with their state."""
        from client.answers import GrantInfo

        rows = self._json("GET", "/v1/grants", auth=True)
        if not isinstance(rows, list):
            raise ArchiverFailed("The Archiver's grant list is malformed.")
        return [GrantInfo.from_json(row) for row in rows]

    def grant(self, grant_id: str) -> GrantBlob:
        """One approved grant addressed to this viewer: its description and the grant itself
        (opaque; opened on the grantee's token, keyservice.grants.open_grant)."""
        from client.answers import GrantBlob, GrantInfo

        body = self._json("GET", f"/v1/grants/{grant_id}", auth=True)
        if not isinstance(body, dict) or not isinstance(body.get("grant"), str):
            raise ArchiverFailed("The Archiver's answer for the grant is malformed.")
        try:
            blob = base64.b64decode(body["grant"], validate=True)
        except (binascii.Error, ValueError):
            raise FormatError("The grant the Archiver sent is not base64.") from None
        return GrantBlob(GrantInfo.from_json(body), blob)

    @contextmanager
    def grant_recording(self, grant_id: str, request: StreamRequest) -> Iterator[Iterator[bytes]]:
        """The fusion stream of (part of) a grant's range: segments and manifests, no key
        material (the keys are in the grant)."""
        _check_request(request, Mode.PLAYBACK, request.cameras[0], request.from_ms,
                       request.to_ms)
        with self._stream(f"/v1/grants/{grant_id}/recording",
                          {"from_ms": request.from_ms, "to_ms": request.to_ms,
                           "nonce": request.nonce.hex()}, read_timeout=self.timeout) as it:
            yield it

    @contextmanager
    def live(self, camera: str, duration_s: float,
             request: StreamRequest) -> Iterator[Iterator[bytes]]:
        """A live fusion stream for ``duration_s`` seconds (``request``: live_request(camera,
        duration_s); give the same one to the Player)."""
        _check_request(request, Mode.LIVE, camera)
        # The stream starts at this machine's clock when the request was made, not when the
        # Archiver got it: a relay holding the request back cannot skip the start.
        params: dict[str, Any] = {"duration_s": duration_s, "nonce": request.nonce.hex(),
                                  "from_ms": request.from_ms}
        # No read timeout: a camera may be silent for a long time in live mode.
        with self._stream(f"/v1/cameras/{camera}/live", params, read_timeout=None) as it:
            yield it

    @contextmanager
    def _stream(self, path: str, params: dict[str, Any],
                read_timeout: float | None) -> Iterator[Iterator[bytes]]:
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        try:
            cm = self._http.stream("GET", path, params=params, headers=self._headers(),
                                   timeout=timeout)
            response = cm.__enter__()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        try:
            if response.status_code >= 300:
                try:
                    response.read()
                except httpx.HTTPError as exc:
                    raise self._unreachable(exc) from None
                raise self._error(response)
            media = response.headers.get("content-type", "").split(";")[0].strip()
            if media != MEDIA_TYPE:
                raise ArchiverFailed(f"The Archiver sent {media or 'no content type'} instead "
                                     "of a fusion stream.")
            self._streaming.add(response)
            if self._interrupted:  # interrupted while this stream was being opened
                _shut_down(response)
            yield self._chunks(response)
        finally:
            self._streaming.discard(response)
            try:
                cm.__exit__(None, None, None)
            except httpx.HTTPError:
                pass  # closing a broken connection: the error that matters was raised already

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise StreamTruncated(
                f"The connection to the Archiver broke mid-stream ({exc.__class__.__name__}) "
                "before the signed end record.") from None


def _shut_down(response: httpx.Response) -> None:
    """Shut a streamed response's socket down in both directions, leaving it open: the
    thread reading it sees the end and closes it (``ArchiverSession.interrupt``)."""
    network = response.extensions.get("network_stream")
    sock = network.get_extra_info("socket") if network is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already
