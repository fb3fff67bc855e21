"""Throwaway tokens: SoftHSM tokens in private directories and a software TPM (swtpm +
tpm2-abrmd + a tpm2-pkcs11 token). Real PKCS#11, no mocks.

SoftHSM reads its configuration (SOFTHSM2_CONF) once per loaded module, at C_Initialize. A
``SoftHsmStore`` therefore has its own copy of the SoftHSM module beside its own configuration:
each store is a separate SoftHSM instance in this process, initialised with SOFTHSM2_CONF set
only for that one call (then restored), so no store changes the process's environment or sees
another's tokens. Subprocesses are given the store's ``env`` explicitly. Module paths are
resolved (realpath): keyservice.token loads each module once under its real path.

``use_softhsm_dir`` (one store for a whole process, through the environment) is kept for the
benchmarks, which are processes of their own. The software TPM's start and stop scripts are in
the checkout's hsm-config/ (not shipped with the package).
"""

from __future__ import annotations

import itertools
import os
import secrets
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from keyservice.pkcs11uri import Pkcs11Uri
from keyservice.softhsm import write_config
from keyservice.token import Token, TokenIdentity, init_token, unload_module

# The software TPM's scripts live in a checkout (hsm-config/), not in the installed package.
HSM_CONFIG = Path(__file__).resolve().parents[1] / "hsm-config"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TPM_MODULE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/pkcs11/libtpm2_pkcs11.so",
)
START_SWTPM = HSM_CONFIG / "start-swtpm.sh"
STOP_SWTPM = HSM_CONFIG / "stop-swtpm.sh"
TPM_TOOLS = ("swtpm", "tpm2_ptool", "tpm2-abrmd", "dbus-daemon")

_counter = itertools.count(1)


@dataclass(frozen=True)
class TokenHandle:
    """A throwaway token: ``uri`` (with module-path and pin-value) names the token, no object."""

    uri: str
    label: str
    pin: str
    so_pin: str
    module: str
    kind: str          # "softhsm" or "tpm"
    workdir: Path      # where enroll_viewer writes PEM files
    conf: Path | None = None  # a SoftHSM store's softhsm2.conf (None: the process's environment)

    @property
    def env(self) -> dict[str, str]:
        """What a subprocess needs in its environment to find this token (SOFTHSM2_CONF of the
        token's store); empty when the token needs nothing (the TPM exports its own)."""
        return {"SOFTHSM2_CONF": str(self.conf)} if self.conf is not None else {}

    def object_uri(self, name: str, *, pin: bool = True) -> str:
        uri = Pkcs11Uri.parse(self.uri).with_object(name)
        if not pin:
            uri = Pkcs11Uri(token=uri.token, object=uri.object, module_path=uri.module_path)
        return uri.to_uri()

    def open(self) -> Token:
        return Token.open(self.uri)


def _make_uri(label: str, module: str, pin: str) -> str:
    return Pkcs11Uri(token=label, module_path=module, pin_value=pin).to_uri()


def _random_pin() -> str:
    return f"{secrets.randbelow(10**8):08d}"  # distinct per token: wrong-PIN tests mean it


# --- SoftHSM --------------------------------------------------------------------------------
def softhsm_available() -> bool:
    return shutil.which("softhsm2-util") is not None and Path(SOFTHSM_MODULE).is_file()


def use_softhsm_dir(directory: Path) -> str | None:
    """Make ``directory`` this process's SoftHSM store (and its pem/ the PEM directory);
    returns the previous SOFTHSM2_CONF, for ``restore_env``."""
    conf = write_config(directory)
    (directory / "pem").mkdir(exist_ok=True)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return previous


@contextmanager
def softhsm_conf(conf: Path) -> Iterator[None]:
    """SOFTHSM2_CONF set to ``conf`` for one library call (the module's C_Initialize), then
    restored: the process's environment is not the place for a store's configuration."""
    saved = {"SOFTHSM2_CONF": os.environ.get("SOFTHSM2_CONF")}
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield
    finally:
        restore_env(saved)


@dataclass(frozen=True)
class SoftHsmStore:
    """A private SoftHSM instance: ``directory``/softhsm2.conf, its tokens/ directory, and its
    own copy of the SoftHSM module (one C_Initialize per module file, so one configuration per
    copy). ``env`` is what a subprocess needs to see the same tokens."""

    directory: Path
    conf: Path
    module: str

    @classmethod
    def create(cls, directory: Path) -> SoftHsmStore:
        if not softhsm_available():
            raise RuntimeError("SoftHSM (softhsm2) is not installed: apt-get install softhsm2")
        conf = write_config(directory)
        (directory / "pem").mkdir(exist_ok=True)
        module = directory / "libsofthsm2.so"  # keeps "softhsm" in the name: the error hints
        shutil.copyfile(os.path.realpath(SOFTHSM_MODULE), module)
        return cls(conf.parent, conf, os.path.realpath(module))

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def new_token(self, label: str | None = None) -> TokenHandle:
        """A fresh token in this store, with random PINs."""
        label = label or f"t{next(_counter)}-{secrets.token_hex(3)}"
        pin, so_pin = _random_pin(), _random_pin()
        # In-process (SoftHSM would not see a token softhsm2-util made after C_Initialize); the
        # first call loads this store's module, which reads SOFTHSM2_CONF then and only then.
        with softhsm_conf(self.conf):
            init_token(self.module, label, so_pin=so_pin, pin=pin)
        return TokenHandle(uri=_make_uri(label, self.module, pin), label=label, pin=pin,
                           so_pin=so_pin, module=self.module, kind="softhsm",
                           workdir=self.directory / "pem", conf=self.conf)

    def close(self) -> None:
        """Close the store's sessions and C_Finalize its module (its tokens become unusable)."""
        unload_module(self.module)


def new_softhsm_token(workdir: Path, label: str | None = None) -> TokenHandle:
    """A fresh token in this process's SoftHSM store, with random PINs."""
    module = os.path.realpath(SOFTHSM_MODULE)
    label = label or f"t{next(_counter)}-{secrets.token_hex(3)}"
    pin, so_pin = _random_pin(), _random_pin()
    # In-process: SoftHSM would not see a token softhsm2-util made after C_Initialize.
    init_token(module, label, so_pin=so_pin, pin=pin)
    return TokenHandle(uri=_make_uri(label, module, pin), label=label, pin=pin, so_pin=so_pin,
                       module=module, kind="softhsm", workdir=workdir)


# --- the software TPM -----------------------------------------------------------------------
def tpm_module() -> str | None:
    return next((p for p in TPM_MODULE_CANDIDATES if Path(p).is_file()), None)


def tpm_missing() -> list[str]:
    """What the software TPM lacks on this machine (empty: it can run)."""
    missing = [tool for tool in TPM_TOOLS if shutil.which(tool) is None]
    return missing + (["tpm2-pkcs11"] if tpm_module() is None else [])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port p with p and p+1 free (swtpm's server and control ports)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65535 and _port_free(port + 1):
            return port
    raise RuntimeError("no two adjacent free TCP ports on 127.0.0.1")


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            values[key] = value
    return values


def restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@dataclass
class SoftwareTpm:
    """swtpm + tpm2-abrmd + a tpm2-pkcs11 token, started by hsm-config/start-swtpm.sh in
    ``directory``; its environment is exported into this process (subprocesses can use the
    token too: abrmd multiplexes clients) until ``stop``."""

    directory: Path
    handle: TokenHandle
    saved_env: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def start(cls, directory: Path, label: str = "tpmtok") -> SoftwareTpm:
        module = tpm_module()
        if module is None or tpm_missing():
            raise RuntimeError(f"software TPM not available (missing: {', '.join(tpm_missing())})")
        pin, so_pin = _random_pin(), _random_pin()
        env = {**os.environ, "SWTPM_PORT": str(free_port_pair()), "TPM_LABEL": label,
               "TPM_PIN": pin, "TPM_SO_PIN": so_pin}
        result = subprocess.run(["bash", str(START_SWTPM), str(directory)], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            subprocess.run(["bash", str(STOP_SWTPM), str(directory)], capture_output=True,
                           check=False)
            raise RuntimeError(f"start-swtpm.sh failed: {result.stderr.strip()}")
        exported = _read_env_file(directory / "tpm.env")
        saved = {key: os.environ.get(key) for key in exported}
        os.environ.update(exported)
        (directory / "pem").mkdir(exist_ok=True)
        real = os.path.realpath(module)
        handle = TokenHandle(uri=_make_uri(label, real, pin), label=label, pin=pin,
                             so_pin=so_pin, module=real, kind="tpm", workdir=directory / "pem")
        return cls(directory, handle, saved)

    def stop(self) -> None:
        unload_module(self.handle.module)  # C_Finalize first, so the module flushes its objects
        subprocess.run(["bash", str(STOP_SWTPM), str(self.directory)], capture_output=True,
                       timeout=60, check=False)
        restore_env(self.saved_env)


# --- identities -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EnrolledViewer:
    """A viewer identity on a throwaway token: ``uri`` names the key (with the PIN, for
    tests), ``certificate`` is its PEM file, ``env`` what a subprocess (fusion-client) needs
    to find the token."""

    name: str
    token: TokenHandle
    uri: str
    certificate: Path
    key_type: str = "rsa"

    @classmethod
    def enrol(cls, token: TokenHandle, name: str, key_type: str = "rsa",
              bits: int = 2048) -> EnrolledViewer:
        pem = enroll_viewer(token, name, bits=bits, key_type=key_type)
        return cls(name, token, token.object_uri(name), pem, key_type)

    @property
    def env(self) -> dict[str, str]:
        return self.token.env

    def identity(self) -> TokenIdentity:
        """The identity, its private key on the token (opened in this process)."""
        return Token.open(self.token.uri).identity(self.name)


def enroll_viewer(token: TokenHandle, name: str, bits: int = 2048, key_type: str = "rsa") -> Path:
    """Enrol identity ``name`` on ``token`` (key on the token) and return its certificate PEM.
    ``key_type``: "rsa" (``bits``) or "ec" (P-256)."""
    with Token.open(token.uri) as opened:
        result = opened.enroll(name, bits=bits, key_type=key_type)
    path = token.workdir / f"{token.label}-{name}.pem"
    path.write_bytes(result.pem())
    return path
