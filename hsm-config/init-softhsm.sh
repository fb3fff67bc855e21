#!/usr/bin/env bash
# Create a private SoftHSM token directory and a token in it (development only: SoftHSM keeps
# keys in files protected by the PIN, not in hardware).
#
#   hsm-config/init-softhsm.sh DIR [LABEL] [PIN] [SO_PIN]      (defaults: viewers 1234 5678)
#   export SOFTHSM2_CONF=DIR/softhsm2.conf                     (printed at the end)
#
# Same result as `fusion-keys softhsm-init --dir DIR --label LABEL --pin PIN --so-pin SO_PIN`.
set -euo pipefail

DIR=${1:?usage: init-softhsm.sh DIR [LABEL] [PIN] [SO_PIN]}
LABEL=${2:-viewers}
PIN=${3:-1234}
SO_PIN=${4:-5678}
HERE=$(cd "$(dirname "$0")" && pwd)

command -v softhsm2-util >/dev/null || {
    echo "init-softhsm.sh: softhsm2-util is missing; apt-get install softhsm2 opensc" >&2
    exit 1
}
mkdir -p "$DIR/tokens"
DIR=$(cd "$DIR" && pwd)
chmod 700 "$DIR/tokens"   # the token files hold the (PIN-encrypted) keys
sed "/^directories.tokendir/s|@TOKENDIR@|$DIR/tokens|" "$HERE/softhsm2.conf.template" > "$DIR/softhsm2.conf"
export SOFTHSM2_CONF="$DIR/softhsm2.conf"

if softhsm2-util --show-slots | grep -Eq "^[[:space:]]*Label:[[:space:]]+$LABEL[[:space:]]*$"; then
    echo "init-softhsm.sh: a token labelled '$LABEL' already exists in $DIR; reusing it." >&2
else
    softhsm2-util --init-token --free --label "$LABEL" --pin "$PIN" --so-pin "$SO_PIN" >/dev/null
fi
echo "export SOFTHSM2_CONF=$DIR/softhsm2.conf"
