"""The fusion_testkit pytest plugin as a developer at an integrator uses it (issue 24, item 3): a
project of their own, outside this repository, with nothing but the documented test file, run by
pytest with the installed package. The test file is the example of docs/testing.md, extracted
from the page, so the page cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fusion_testkit.server import ArchiverServer
from fusion_testkit.tokens import EnrolledViewer, SoftHsmStore, enroll_viewer, softhsm_available
from fusion_testkit.viewer import login
from keyservice.token import Token

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "testing.md"


def documented_example() -> str:
    """The first Python block of docs/testing.md."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"),
                        re.MULTILINE | re.DOTALL)
    assert blocks, "docs/testing.md has no ```python example"
    return blocks[0]


def test_the_example_is_about_ten_lines() -> None:
    body = [line for line in documented_example().splitlines()
            if line.strip() and not line.startswith(("from ", "import "))]
    assert len(body) <= 12, body


@pytest.mark.skipif(shutil.which("ffmpeg") is None or not softhsm_available(),
                    reason="needs ffmpeg and SoftHSM (softhsm2)")
def test_the_documented_example_passes_in_a_separate_project(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    project = tmp_path_factory.mktemp("integrator-project")
    assert ROOT not in project.parents and project != ROOT
    (project / "test_archive.py").write_text(documented_example(), encoding="utf-8")
    # A developer's shell: none of our SoftHSM configuration, PIN or import path, and plugins
    # load from entry points (that is how the fixtures are found: there is no conftest).
    drop = ("SOFTHSM2_CONF", "FUSION_PIN", "FUSION_TOKEN", "FUSION_TLS_CA", "PYTHONPATH",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "test_archive.py"],
        cwd=project, env=env, capture_output=True, text=True, timeout=280,
        stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"\b1 passed\b", output), output
    assert "skipped" not in output


@pytest.mark.skipif(not softhsm_available(), reason="needs SoftHSM (softhsm2)")
def test_stores_are_separate_and_leave_the_environment_alone(tmp_path: Path) -> None:
    before = dict(os.environ)
    first, second = (SoftHsmStore.create(tmp_path / name) for name in ("a", "b"))
    try:
        one, two = first.new_token("same-label"), second.new_token("same-label")
        assert dict(os.environ) == before  # SOFTHSM2_CONF was set only around C_Initialize
        enroll_viewer(one, "alice")
        with Token.open(one.uri) as token:
            assert [i.label for i in token.identities()] == ["alice"]
        with Token.open(two.uri) as token:  # same label, other store: not alice's token
            assert token.identities() == []
        # A subprocess sees the token only when given the store's environment explicitly.
        listing = [sys.executable, "-m", "keyservice.cli", "list", "--token", one.uri]
        bare = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
        without = subprocess.run(listing, env=bare, capture_output=True, text=True, timeout=120)
        given = subprocess.run(listing, env={**bare, **one.env}, capture_output=True, text=True,
                               timeout=120)
        assert without.returncode != 0 and "SOFTHSM2_CONF" in without.stderr
        assert given.returncode == 0 and "alice" in given.stdout, given.stderr
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("fusion_viewer", ["rsa", "ec"], indirect=True)
def test_an_enrolled_viewer_of_either_kind_logs_in_over_https(
        fusion_archiver: ArchiverServer, fusion_viewer: EnrolledViewer) -> None:
    assert fusion_archiver.url.startswith("https://") and fusion_archiver.tls_ca is not None
    public = x509.load_pem_x509_certificate(fusion_viewer.certificate.read_bytes()).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey if fusion_viewer.key_type == "ec"
                      else rsa.RSAPublicKey)
    fusion_archiver.add_viewer(fusion_viewer.certificate)
    assert login(fusion_archiver.url, fusion_viewer.identity(), fusion_archiver.verify)


@pytest.mark.parametrize("fusion_archiver", ["http"], indirect=True)
def test_the_archiver_fixture_runs_plain_http_on_request(fusion_archiver: ArchiverServer) -> None:
    assert fusion_archiver.url.startswith("http://") and fusion_archiver.tls_ca is None
    assert fusion_archiver.admin("GET", "/v1/admin/cameras", expect=200) == []


def test_only_the_plugin_imports_pytest() -> None:
    importers = sorted(path.name for path in (ROOT / "fusion_testkit").glob("*.py")
                       if re.search(r"^(import|from) pytest\b", path.read_text(), re.MULTILINE))
    assert importers == ["pytest_plugin.py"]
