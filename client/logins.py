"""A viewer logged in to one Archiver (``login``: proof of possession with the Archiver's
certificate pinned, or issued by the site CA) and a fusion stream asked of it (``stream``).

Below both client.viewer (the library) and client.site (the site's Archivers, followed when
checked), which use them; client.viewer re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from cryptography import x509

from client.pinning import KnownArchivers, PinDecision, check_archiver
from client.session import ArchiverSession, LoginResult
from keyservice.format import Mode
from keyservice.identity import Identity
from keyservice.reader import StreamRequest

__all__ = ["Login", "login", "stream"]


@dataclass(frozen=True)
class Login:
    """A logged-in session: the Archiver's answer and how its certificate was trusted
    (pinned already, given explicitly, or trusted on first use and pinned now)."""

    url: str
    result: LoginResult
    pin: PinDecision

    @property
    def archiver_fingerprint(self) -> bytes:
        """SHA-256 of the Archiver's certificate: every stream must be signed by it."""
        return self.result.archiver_fingerprint

    @property
    def viewer_fingerprint(self) -> str:
        """This viewer's certificate fingerprint (hex), as the Archiver knows it."""
        return self.result.viewer_fingerprint


def login(session: ArchiverSession, identity: Identity, *,
          archiver_cert: x509.Certificate | None = None, known: KnownArchivers | None = None,
          allow_first_use: bool = True, site_ca: Sequence[x509.Certificate] = ()) -> Login:
    """Prove possession of the token to the Archiver, with its certificate pinned: it must be
    ``archiver_cert`` if given (which then replaces an older pin), else the one pinned for the
    URL in ``known`` (default: the user's known_archivers file), else it is trusted on first use
    and pinned (unless ``allow_first_use`` is False). With ``site_ca`` (``--site-ca``), a
    signing certificate the site CA issued is accepted without a pin, and any other refused
    (pins still apply beside it: client.pinning.check_archiver). The check runs before the
    token is used, so an impersonator gets nothing from it. HTTPS trust is the session's."""
    store = known if known is not None else KnownArchivers.default()
    decisions: list[PinDecision] = []

    def check(cert: x509.Certificate) -> None:
        decisions.append(check_archiver(session.url, cert, store=store, explicit=archiver_cert,
                                        allow_first_use=allow_first_use, site_ca=site_ca))

    result = session.login(identity, check)
    return Login(session.url, result, decisions[-1])



def stream(session: ArchiverSession, request: StreamRequest, *,
           grant_id: str | None = None) -> AbstractContextManager[Iterator[bytes]]:
    """The fusion stream that answers ``request``, as received chunks: a recorded range, a
    live stream, or (``grant_id``) a range under an access grant. The request's nonce is the
    one sent; give the same request to the Player (``player_for``)."""
    camera = request.cameras[0]
    if request.mode == Mode.LIVE:
        return session.live(camera, (request.to_ms - request.from_ms) / 1000, request)
    if grant_id is not None:
        return session.grant_recording(grant_id, request)
    return session.recording(camera, request.from_ms, request.to_ms, request)
