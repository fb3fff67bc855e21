#!/usr/bin/env bash
# Installs everything the project needs on Debian (12+): system packages, then a virtualenv in .venv.
# Idempotent: installs only what is missing. Uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev build-essential
  softhsm2 opensc openssl
  pcscd vsmartcard-vpcd opensc-pkcs11 ykcs11 yubico-piv-tool
  swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus
  ffmpeg
  socat                        # the camera host's TLS forwarder (deploy/fusion-camera-forwarder.service)
  # A real RTSP camera for the tests: GStreamer's gst-rtsp-server, driven by the system Python.
  python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly
  chromium fonts-dejavu-core   # the viewer's browser tests (Playwright drives this Chromium)
  systemd                      # systemd-analyze: the deploy/ unit's tests (verify, security)
  postgresql                   # the site directory's tests: a real server (initdb, pg_ctl)
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1))." >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's own chatter goes to a log, shown only if the install fails.
{ .venv/bin/python -m pip install --upgrade pip &&
  .venv/bin/python -m pip install -e ".[archiver,test,bench]"; } > .venv/pip-install.log 2>&1 ||
  { cat .venv/pip-install.log >&2; echo "setup: pip install failed (log above)." >&2; exit 1; }
echo "setup: ready (.venv)" >&2
