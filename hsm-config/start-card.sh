#!/usr/bin/env bash
# Start the smartcard stack for development, without hardware: pcscd with the vsmartcard-vpcd
# virtual reader, and the project's emulated PIV card (tests/fixtures/piv/card.py) in it.
#
#   hsm-config/start-card.sh DIR         # config, socket, logs, pid and env files go into DIR
#   . DIR/card.env                       # PCSCLITE_CSOCK_NAME, OPENSC_MODULE, YKCS11_MODULE
#   fusion-keys list --token "pkcs11:?module-path=$OPENSC_MODULE&pin-value=123456"
#   hsm-config/stop-card.sh DIR          # stops the card and pcscd by their recorded pids
#
# The card: PIN 123456, PUK 12345678, management key 010203040506070801020304050607080102030405060708
# (3DES, the PIV default); its state (keys, objects, PIN counter) lives in DIR/card.json and
# survives a restart. Pull it with `kill $(cat DIR/card.pid)`, insert it again with
# `START_PCSCD=0 hsm-config/start-card.sh DIR`.
#
# Environment (all optional): VPCD_PORT (35963, vpcd's default), START_PCSCD (1), START_CARD (1),
# PYTHON (.venv/bin/python of this checkout).
#
# Why a private mount namespace: pcscd 1.9 has its socket and pid file at the compiled-in
# /run/pcscd and refuses to start beside another pcscd. Here it runs with DIR/run bound over
# /run/pcscd, so it never meets the system's pcscd (or another developer's); clients find it
# through PCSCLITE_CSOCK_NAME (honoured by libpcsclite, so by OpenSC, ykcs11, yubico-piv-tool).
# The reader is named "Yubico YubiKey vpcd" because ykcs11 lists only readers named "Yubico...".
set -euo pipefail

DIR=${1:?usage: start-card.sh DIR}
PORT=${VPCD_PORT:-35963}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
VPCD_DRIVER=/usr/lib/pcsc/drivers/serial/libifdvpcd.so

for tool in pcscd unshare; do
    command -v "$tool" >/dev/null || {
        echo "start-card.sh: $tool is missing; install pcscd vsmartcard-vpcd opensc" \
             "opensc-pkcs11 ykcs11 yubico-piv-tool (scripts/setup.sh does)." >&2
        exit 1
    }
done
[[ -e "$VPCD_DRIVER" ]] || { echo "start-card.sh: vsmartcard-vpcd is not installed." >&2; exit 1; }

mkdir -p "$DIR/reader.conf.d" "$DIR/run"
DIR=$(cd "$DIR" && pwd)

if [[ "${START_PCSCD:-1}" == 1 ]]; then
    if [[ -e "$DIR/pcscd.pid" ]] && kill -0 "$(cat "$DIR/pcscd.pid")" 2>/dev/null; then
        echo "start-card.sh: a pcscd from $DIR is already running (pid $(cat "$DIR/pcscd.pid"));" \
             "stop it with stop-card.sh $DIR." >&2
        exit 1
    fi
    # DEVNAME /dev/null:PORT: vpcd listens on PORT and the card connects to it.
    cat > "$DIR/reader.conf.d/vpcd" <<EOF
FRIENDLYNAME "Yubico YubiKey vpcd"
DEVICENAME   /dev/null:$PORT
LIBPATH      $VPCD_DRIVER
CHANNELID    $PORT
EOF
    echo "$PORT" > "$DIR/vpcd.port"
    rm -f "$DIR/run/pcscd.comm"
    if [[ $(id -u) -eq 0 ]]; then
        mkdir -p /run/pcscd   # the mount point (stays empty outside the namespace)
        ns=(unshare --mount --propagation private)
        inner='mount --bind "$1" /run/pcscd'
    else  # a user namespace gives an unprivileged user its own mounts
        ns=(unshare --user --map-root-user --mount --propagation private)
        inner='mount -t tmpfs tmpfs /run && mkdir -p /run/pcscd && mount --bind "$1" /run/pcscd'
    fi
    "${ns[@]}" sh -c "set -e; $inner; exec pcscd --foreground --config \"\$2\"" pcscd \
        "$DIR/run" "$DIR/reader.conf.d" >> "$DIR/pcscd.log" 2>&1 < /dev/null &
    echo $! > "$DIR/pcscd.pid"
    for _ in $(seq 100); do
        [[ -S "$DIR/run/pcscd.comm" ]] && break
        kill -0 "$(cat "$DIR/pcscd.pid")" 2>/dev/null || {
            echo "start-card.sh: pcscd exited; see $DIR/pcscd.log:" >&2
            tail -5 "$DIR/pcscd.log" >&2
            exit 1
        }
        sleep 0.1
    done
    [[ -S "$DIR/run/pcscd.comm" ]] || { echo "start-card.sh: pcscd did not start." >&2; exit 1; }
fi

module() {  # the PKCS#11 module's path on this system (multiarch directory)
    local found
    found=$(ls /usr/lib/*/"$1" /usr/lib/"$1" 2>/dev/null | head -1 || true)
    echo "${found:-$1}"
}
cat > "$DIR/card.env" <<EOF
export PCSCLITE_CSOCK_NAME=$DIR/run/pcscd.comm
export OPENSC_MODULE=$(module opensc-pkcs11.so)
export YKCS11_MODULE=$(module libykcs11.so)
EOF

if [[ "${START_CARD:-1}" == 1 ]]; then
    [[ -x "$PYTHON" ]] || { echo "start-card.sh: $PYTHON not found; run scripts/setup.sh." >&2; exit 1; }
    port=$(cat "$DIR/vpcd.port")
    rm -f "$DIR/card.inserted"
    (cd "$REPO" && exec "$PYTHON" -m tests.fixtures.piv.card --port "$port" \
        --state "$DIR/card.json") >> "$DIR/card.log" 2>&1 < /dev/null &
    echo $! > "$DIR/card.pid"
    for _ in $(seq 200); do
        [[ -e "$DIR/card.inserted" ]] && break
        sleep 0.1
    done
    if [[ ! -e "$DIR/card.inserted" ]]; then
        kill "$(cat "$DIR/card.pid")" 2>/dev/null || true  # ours: never leave it behind
        rm -f "$DIR/card.pid"
        echo "start-card.sh: the card was not powered up (is pcscd from this DIR running?);" \
             "see $DIR/card.log and $DIR/pcscd.log." >&2
        exit 1
    fi
    echo "start-card.sh: card inserted (pcscd pid $(cat "$DIR/pcscd.pid" 2>/dev/null || echo ?)," \
         "card pid $(cat "$DIR/card.pid")); now: . $DIR/card.env" >&2
fi
