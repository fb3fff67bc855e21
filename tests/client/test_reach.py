"""fusion-client says what failed when it cannot reach the Archiver: a certificate it cannot
verify (with OpenSSL's reason), a closed port; and --tls-ca makes the same HTTPS Archiver work."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from fusion_testkit.client_cli import EXIT, Client, Viewer
from tests.fixtures.server import ArchiverServer


def test_viewer_cli_reports_tls_verification_then_trusts_tls_ca(
        https_archiver: ArchiverServer, client: Client,
        make_viewer: Callable[[str], Viewer]) -> None:
    viewer = make_viewer("tess")
    https_archiver.add_camera("cam1")
    https_archiver.add_viewer(viewer.pem)
    refused = client("cameras", "--archiver", https_archiver.url, "--token", viewer.uri)
    assert refused.code == EXIT["unreachable"], refused.stderr
    assert "TLS certificate verification failed" in refused.stderr
    assert "--tls-ca" in refused.stderr
    assert https_archiver.tls_ca is not None
    trusted = client("cameras", "--archiver", https_archiver.url, "--token", viewer.uri,
                     "--tls-ca", str(https_archiver.tls_ca), "--json")
    assert trusted.code == 0, trusted.stderr
    assert [c["name"] for c in json.loads(trusted.stdout)["cameras"]] == ["cam1"]


def test_viewer_cli_reports_a_closed_port(client: Client,
                                          make_viewer: Callable[[str], Viewer]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = client("cameras", "--archiver", f"http://127.0.0.1:{port}", "--token",
                    make_viewer("rex").uri)
    assert result.code == EXIT["unreachable"]
    assert "connection refused" in result.stderr, result.stderr
