"""fusion-keys, run as a real process against real tokens: exit codes, messages, no tracebacks."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fusion_testkit.commands import assert_clean_failure, fusion_keys
from keyservice import certs
from keyservice.identity import OaepHash, fingerprint
from keyservice.pkcs11uri import Pkcs11Uri
from tests.fixtures.tokens import TokenHandle

SPY_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"
INIT_SOFTHSM = Path(__file__).resolve().parents[2] / "hsm-config" / "init-softhsm.sh"


def test_console_script_points_at_main() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("fusion-keys") == "keyservice.cli:main"


def test_readme_flow(tmp_path: Path) -> None:
    """softhsm-init + enroll + selftest from a fresh directory, as the README shows."""
    hsm = tmp_path / "hsm"
    init = fusion_keys("softhsm-init", "--dir", str(hsm), "--label", "viewers", "--pin", "1234",
                       "--so-pin", "5678")
    assert init.returncode == 0, init.stderr
    export_line = init.stdout.strip()
    assert export_line == f"export SOFTHSM2_CONF={hsm / 'softhsm2.conf'}"
    env = {k: v for k, v in os.environ.items() if k != "FUSION_PIN"}
    env["SOFTHSM2_CONF"] = export_line.split("=", 1)[1]
    uri = "pkcs11:token=viewers;object=alice?pin-value=1234"
    pem = tmp_path / "alice.pem"
    enrolled = fusion_keys("enroll", "--token", uri, "--out", str(pem), "--key", "rsa2048",
                           env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    assert "SHA-1" in enrolled.stdout and "RSA-2048" in enrolled.stdout
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert certs.read_oaep_hash(cert) is OaepHash.SHA1
    selftest = fusion_keys("selftest", "--token", uri, env=env)
    assert selftest.returncode == 0, selftest.stderr
    assert "Self-test passed for 'alice'" in selftest.stdout
    listed = fusion_keys("list", "--token", uri, env=env)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith("alice"))
    assert row.split()[1:4] == ["RSA-2048", "sha1*", f"{cert.not_valid_after_utc:%Y-%m-%d}"]
    assert row.split()[4] == fingerprint(cert).hex()
    copy = tmp_path / "copy.pem"
    exported = fusion_keys("export", "--token", uri, "--out", str(copy), env=env)
    assert exported.returncode == 0, exported.stderr
    assert copy.read_bytes() == pem.read_bytes()
    assert_clean_failure(fusion_keys("export", "--token", uri, "--out", str(copy), env=env), 2,
                         "already exists")
    if shutil.which("openssl"):
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(pem), str(pem)],
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
    # PIN from the environment instead of the URI
    bare = "pkcs11:token=viewers;object=alice"
    assert fusion_keys("selftest", "--token", bare, env={**env, "FUSION_PIN": "1234"}
                       ).returncode == 0
    assert_clean_failure(fusion_keys("selftest", "--token", bare, env=env), 20, "No PIN given")
    # delete needs confirmation; without a terminal, --yes
    assert_clean_failure(fusion_keys("delete", "--token", uri, env=env), 2, "--yes")
    deleted = fusion_keys("delete", "--token", uri, "--yes", env=env)
    assert deleted.returncode == 0 and "3 objects" in deleted.stdout
    assert "holds no identities" in fusion_keys("list", "--token", uri, env=env).stdout
    again = fusion_keys("softhsm-init", "--dir", str(hsm), "--label", "viewers", "--pin", "1234",
                        "--so-pin", "5678")
    assert_clean_failure(again, 25, "already exists")


def test_wrong_pin_exits_21_and_is_tried_once(softhsm_token: TokenHandle, tmp_path: Path) -> None:
    if not Path(SPY_MODULE).is_file():
        pytest.skip("pkcs11-spy (opensc) is not installed")
    # pkcs11-spy sits between fusion-keys and SoftHSM and logs every call: count the C_Login.
    env = {k: v for k, v in os.environ.items() if k != "FUSION_PIN"}
    env["PKCS11SPY"] = softhsm_token.module
    log = tmp_path / "spy.log"
    env["PKCS11SPY_OUTPUT"] = str(log)
    wrong = Pkcs11Uri(token=softhsm_token.label, module_path=SPY_MODULE,
                      pin_value="00000000").to_uri()
    result = fusion_keys("list", "--token", wrong, env=env)
    assert_clean_failure(result, 21, "PIN")
    assert "00000000" not in result.stderr
    calls = log.read_text()
    assert calls.count("C_Login") == 1
    assert "CKR_PIN_INCORRECT" in calls
    # control: the spy does see a successful login too
    log.unlink()
    right = Pkcs11Uri(token=softhsm_token.label, module_path=SPY_MODULE,
                      pin_value=softhsm_token.pin).to_uri()
    ok = fusion_keys("list", "--token", right, env=env)
    assert ok.returncode == 0, ok.stderr
    assert log.read_text().count("C_Login") == 1


def test_error_exit_codes(softhsm_token: TokenHandle, tmp_path: Path) -> None:
    uri = softhsm_token.object_uri("alice")
    pem = tmp_path / "alice.pem"
    assert fusion_keys("enroll", "--token", uri, "--out", str(pem), "--key", "rsa2048"
                       ).returncode == 0
    assert_clean_failure(fusion_keys("enroll", "--token", uri, "--out", str(tmp_path / "b.pem"),
                                     "--key", "rsa2048"), 25, "already has an object named")
    assert not (tmp_path / "b.pem").exists()
    missing_module = Pkcs11Uri(token="x", object="a", module_path=str(tmp_path / "none.so"),
                               pin_value="1").to_uri()
    assert_clean_failure(fusion_keys("list", "--token", missing_module), 27, "does not exist")
    no_token = Pkcs11Uri(token="nope", module_path=softhsm_token.module, pin_value="1").to_uri()
    assert_clean_failure(fusion_keys("list", "--token", no_token), 23, "No token 'nope'")
    assert_clean_failure(fusion_keys("export", "--token", softhsm_token.object_uri("ghost"),
                                     "--out", str(tmp_path / "g.pem")), 24, "'ghost'")
    assert_clean_failure(fusion_keys("list", "--token", "token=viewers"), 2, "pkcs11:")
    assert_clean_failure(fusion_keys("enroll", "--token", softhsm_token.uri, "--out",
                                     str(tmp_path / "n.pem")), 2, "object=NAME")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is no certificate\n")
    assert_clean_failure(fusion_keys("import-cert", "--token", uri, str(garbage)), 30,
                         "not a readable X.509")
    assert_clean_failure(fusion_keys("import-cert", "--token", uri, str(tmp_path / "nofile")),
                         2, "Cannot read")
    stranger = rsa.generate_private_key(65537, 2048)
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(certs.certificate_pem(certs.build_viewer_certificate(
        stranger, "alice", oaep_hash=OaepHash.SHA1, now=datetime.now(UTC))))
    assert_clean_failure(fusion_keys("import-cert", "--token", uri, str(foreign)), 30,
                         "belongs to no key")
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(stranger.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    assert_clean_failure(fusion_keys("import-cert", "--token", uri, str(key_file)), 30,
                         "private key")
    # a usage error from the option parser also exits 2, without a traceback
    bad_key = fusion_keys("enroll", "--token", uri, "--out", str(tmp_path / "k.pem"), "--key",
                          "rsa1024")
    assert bad_key.returncode == 2 and "Traceback" not in bad_key.stderr


def test_csr_and_import_cert(softhsm_token: TokenHandle, tmp_path: Path) -> None:
    uri = softhsm_token.object_uri("bob")
    csr_path = tmp_path / "bob.csr"
    made = fusion_keys("enroll", "--token", uri, "--out", str(csr_path), "--key", "rsa2048",
                       "--csr")
    assert made.returncode == 0, made.stderr
    assert "import-cert" in made.stdout
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert_clean_failure(fusion_keys("selftest", "--token", uri), 24, "no certificate yet")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Site CA")])
    issued = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_name)
              .public_key(csr.public_key()).serial_number(42)
              .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=9))
              .add_extension(csr.extensions.get_extension_for_class(x509.KeyUsage).value,
                             critical=True)
              .sign(ca_key, hashes.SHA256()))
    cert_path = tmp_path / "bob.pem"
    cert_path.write_bytes(certs.certificate_pem(issued))
    imported = fusion_keys("import-cert", "--token", uri, str(cert_path))
    assert imported.returncode == 0, imported.stderr
    assert "Stored the certificate for 'bob'" in imported.stdout
    assert "SHA-1" in imported.stdout and "dropped" in imported.stdout
    selftest = fusion_keys("selftest", "--token", uri)
    assert selftest.returncode == 0, selftest.stderr
    assert_clean_failure(fusion_keys("import-cert", "--token", uri, str(cert_path)), 25,
                         "never overwritten")


def test_tpm_enrol_export_selftest(tpm_token: TokenHandle, tmp_path: Path) -> None:
    name = f"cli-{os.getpid()}-{tmp_path.name}"[:60]
    uri = tpm_token.object_uri(name)
    pem = tmp_path / "tpm.pem"
    enrolled = fusion_keys("enroll", "--token", uri, "--out", str(pem), "--key", "rsa2048")
    assert enrolled.returncode == 0, enrolled.stderr
    assert "SHA-256" in enrolled.stdout
    selftest = fusion_keys("selftest", "--token", uri)
    assert selftest.returncode == 0, selftest.stderr
    assert "SHA-256" in selftest.stdout
    copy = tmp_path / "copy.pem"
    assert fusion_keys("export", "--token", uri, "--out", str(copy)).returncode == 0
    assert copy.read_bytes() == pem.read_bytes()
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    cert.verify_directly_issued_by(cert)
    assert certs.read_oaep_hash(cert) is OaepHash.SHA256
    listed = fusion_keys("list", "--token", uri)
    assert any(line.startswith(name) and "sha256" in line for line in listed.stdout.splitlines())


def test_init_softhsm_script(tmp_path: Path) -> None:
    if shutil.which("softhsm2-util") is None:
        pytest.skip("softhsm2 is not installed")
    result = subprocess.run(["bash", str(INIT_SOFTHSM), str(tmp_path / "h"), "scripted", "4321",
                             "8765"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    conf = tmp_path / "h" / "softhsm2.conf"
    assert result.stdout.strip() == f"export SOFTHSM2_CONF={conf}"
    assert f"directories.tokendir = {tmp_path / 'h' / 'tokens'}" in conf.read_text()
    env = {k: v for k, v in os.environ.items() if k != "FUSION_PIN"}
    env["SOFTHSM2_CONF"] = str(conf)
    uri = "pkcs11:token=scripted;object=eve?pin-value=4321"
    enrolled = fusion_keys("enroll", "--token", uri, "--out", str(tmp_path / "eve.pem"), "--key",
                           "rsa2048", env=env)
    assert enrolled.returncode == 0, enrolled.stderr
