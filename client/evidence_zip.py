"""An evidence package's zip file (docs/evidence.md): written owner-only and atomically,
read with the limits and refusals an untrusted file needs. No CLI: the viewer library writes
packages (client.viewer.export_evidence), ``fusion-client evidence verify`` reads them."""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from keyservice.errors import UsageError
from keyservice.evidence.layout import EvidenceError
from keyservice.exitcodes import ExitCode

__all__ = ["EXIT_NOT_VERIFIED", "MAX_MEMBERS", "MAX_UNPACKED", "PackageUnreadable", "read_zip",
           "write_zip"]

EXIT_NOT_VERIFIED = ExitCode.NOT_VERIFIED  # a check failed: the report says which and why
# Limits on a package read from disk (untrusted): member count and total unpacked size.
MAX_MEMBERS = 200_000
MAX_UNPACKED = 16 * 2**30


class PackageUnreadable(EvidenceError):
    """The package is not a zip file an exporter writes (damaged, encrypted, odd entries)."""

    exit_code = EXIT_NOT_VERIFIED


def write_zip(path: Path, files: dict[str, bytes]) -> str:
    """Write the package as PATH.partial (owner-only: it may hold keys), fsync, rename;
    returns the SHA-256 of the zip file (for the chain of custody)."""
    if path.exists() and not path.is_file():  # the rename would replace a device or a pipe
        raise UsageError(f"{path} is not a regular file; give a file name for the package.")
    partial = path.with_name(path.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            # Stored, not deflated: segments are ciphertext and the video is compressed
            # already; any unzip (or python3 -m zipfile) unpacks it.
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
                for name in sorted(files):
                    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    zf.writestr(info, files[name])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise EvidenceError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_zip(path: Path) -> dict[str, bytes]:
    """The package's files by name; refuses what no exporter writes (directories, absolute or
    parent paths, duplicates, more than the limits)."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UsageError(f"No such file: {path}.") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageUnreadable(f"{path} is not a readable zip file ({exc}).") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_UNPACKED:
            raise PackageUnreadable(f"{path} unpacks to more than an evidence package may hold.")
        files: dict[str, bytes] = {}
        for member in members:
            name = member.filename
            parts = PurePosixPath(name).parts
            if (member.is_dir() or name.startswith("/") or "\\" in name or ".." in parts
                    or name in files):
                raise PackageUnreadable(f"{path} holds an entry no evidence package has: "
                                        f"{name!r}.")
            if member.flag_bits & 0x1:
                # No exporter encrypts a member; zipfile would ask for a password.
                raise PackageUnreadable(f"{path}: {name} is encrypted (zip password "
                                        "protection), which no evidence package uses.")
            try:
                files[name] = zf.read(member)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError,
                    zlib.error, EOFError, ValueError) as exc:
                # Damaged compressed data (zlib.error, EOFError), a bad CRC (BadZipFile),
                # an unsupported method (NotImplementedError): the package is refused.
                raise PackageUnreadable(f"{path}: {name} cannot be read, its compressed data "
                                        f"is damaged or unsupported ({exc}).") from None
    return files
