"""The default Archiver signer (a SoftHSM token in the data directory) leaves the process's
environment as it was (issue 24): it used to set ``SOFTHSM2_CONF`` for the whole process, so an
embedding program's own SoftHSM configuration (its viewers' tokens) was replaced behind its back.

Each case runs in a fresh interpreter: SoftHSM reads its configuration once per process, and
this test process has loaded it already (the session's SoftHSM fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_testkit.server import server_env
from keyservice.softhsm import write_config

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys
from pathlib import Path
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from archiver.settings import Settings
from archiver.signing import open_signer

before = os.environ.get("SOFTHSM2_CONF")
signer = open_signer(Settings(data_dir=Path(sys.argv[1])))
after = os.environ.get("SOFTHSM2_CONF")
signature = signer.sign(b"a manifest")
signer.certificate.public_key().verify(signature, b"a manifest", ec.ECDSA(hashes.SHA256()))
print(json.dumps({"before": before, "after": after,
                  "token": str(Path(sys.argv[1]) / "token" / "softhsm2.conf")}))
"""


def _open_signer(data_dir: Path, conf: Path | None) -> dict[str, str | None]:
    env = server_env()
    if conf is not None:
        env["SOFTHSM2_CONF"] = str(conf)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(data_dir)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("embedder_conf", [False, True], ids=["unset", "embedder's own"])
def test_the_default_signer_leaves_softhsm2_conf_as_it_was(tmp_path: Path,
                                                            embedder_conf: bool) -> None:
    conf = write_config(tmp_path / "embedder-softhsm") if embedder_conf else None
    seen = _open_signer(tmp_path / "archiver", conf)
    # The signer works (it signed, and its certificate verified the signature)...
    assert Path(str(seen["token"])).is_file()
    # ...and the environment is what it was: the embedder's setting, or none at all.
    assert seen["before"] == (str(conf) if conf else None)
    assert seen["after"] == seen["before"]
    assert "SOFTHSM2_CONF" not in os.environ or os.environ["SOFTHSM2_CONF"] != seen["token"]
