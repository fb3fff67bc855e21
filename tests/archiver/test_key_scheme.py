"""The admin surface names a viewer's key scheme (issue 24, item 1): --key-scheme and the JSON
field key_scheme, with the old --oaep-hash / oaep_hash and their spellings still accepted; the
login challenge carries both fields, and a viewer logs in with either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from fusion_testkit import forkserver
from fusion_testkit.pki import SiteCa
from fusion_testkit.server import production_archiver
from fusion_testkit.viewer import login
from keyservice.crypto.login import LoginChallenge
from keyservice.identity import SoftwareEcIdentity, SoftwareIdentity
from keyservice.keyscheme import KeyScheme
from tests.fixtures.server import ArchiverServer


def admin_cli(server: ArchiverServer, *args: str) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "archiver", *args, "--archiver", server.url,
                           "--admin-token", server.admin_token, "--tls-ca", str(server.tls_ca)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_admin_cli_and_api_speak_key_scheme_and_accept_the_old_names(
        site_ca: SiteCa, tmp_path: Path) -> None:
    # Production mode, trusting the site CA's viewers.
    with production_archiver(site_ca, tmp_path / "archiver",
                             extra_args=("--site-ca", str(site_ca.path))) as server:
        _check(server, site_ca, tmp_path)


def _check(https_archiver: ArchiverServer, site_ca: SiteCa, tmp_path: Path) -> None:
    # Site-issued RSA certificates record no OAEP hash: the admin names the scheme.
    viewers = {}
    for name in ("carol", "dave"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        viewers[name] = SoftwareIdentity(site_ca.issue(key.public_key(), name), key)
        (tmp_path / f"{name}.pem").write_bytes(viewers[name].certificate.public_bytes(
            Encoding.PEM))
    new = admin_cli(https_archiver, "viewers", "add", str(tmp_path / "carol.pem"), "--cameras",
                    "all", "--key-scheme", "rsa-oaep-sha1", "--json")
    assert new.returncode == 0, new.stderr
    assert json.loads(new.stdout)["key_scheme"] == "rsa-oaep-sha1"
    old = admin_cli(https_archiver, "viewers", "add", str(tmp_path / "dave.pem"), "--cameras",
                    "all", "--oaep-hash", "sha256", "--json")  # a script from before
    assert old.returncode == 0, old.stderr
    assert json.loads(old.stdout)["key_scheme"] == "rsa-oaep-sha256"
    assert json.loads(old.stdout)["oaep_hash"] == "sha256"  # the old field, old spelling
    listed = admin_cli(https_archiver, "viewers", "list")
    assert "rsa-oaep-sha1" in listed.stdout and "rsa-oaep-sha256" in listed.stdout, listed.stdout
    bad = admin_cli(https_archiver, "viewers", "add", str(tmp_path / "dave.pem"), "--cameras",
                    "all", "--key-scheme", "rsa-oaep-md5")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr

    # The JSON API takes the new field; an EC viewer's scheme is fixed by its key.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    erin = SoftwareEcIdentity(site_ca.issue(ec_key.public_key(), "erin"), ec_key)
    added = https_archiver.admin("POST", "/v1/admin/viewers", {
        "certificate": erin.certificate.public_bytes(Encoding.PEM).decode(), "cameras": "all"},
        expect=201)
    assert (added["key_scheme"], added["oaep_hash"]) == ("ecdh-p256", "ecdh-p256")

    # The challenge names the scheme twice (new field, and the old one for older viewers);
    # each viewer logs in, its token unwrapping under the scheme it was enrolled with.
    for identity, scheme in ((viewers["carol"], KeyScheme.RSA_OAEP_SHA1),
                             (viewers["dave"], KeyScheme.RSA_OAEP_SHA256),
                             (erin, KeyScheme.ECDH_P256)):
        pem = identity.certificate.public_bytes(Encoding.PEM).decode()
        body = httpx.post(f"{https_archiver.url}/v1/sessions/challenge", json={"certificate": pem},
                          verify=https_archiver.verify, timeout=30).json()
        assert (body["key_scheme"], body["oaep_hash"]) == (scheme.label, scheme.legacy_label)
        assert LoginChallenge.from_answer(body).key_scheme is scheme
        older = {k: v for k, v in body.items() if k != "key_scheme"}  # an Archiver before
        assert LoginChallenge.from_answer(older).key_scheme is scheme
        assert login(https_archiver.url, identity, https_archiver.verify)
