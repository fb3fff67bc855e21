#!/usr/bin/env bash
# Start a software TPM (swtpm) behind a resource manager (tpm2-abrmd on a private session D-Bus)
# and create a tpm2-pkcs11 token on it.
#
#   hsm-config/start-swtpm.sh DIR        # state, token store, logs, pid and env files go into DIR
#   . DIR/tpm.env                        # exports what the PKCS#11 module and tools need
#   fusion-keys list --token "pkcs11:token=tpmtok?module-path=$TPM2_PKCS11_MODULE&pin-value=1234"
#   hsm-config/stop-swtpm.sh DIR         # stops abrmd, the D-Bus and swtpm by their recorded pids
#
# Environment (all optional): TPM_LABEL (tpmtok), TPM_PIN (1234), TPM_SO_PIN (5678),
# SWTPM_PORT (2321; the control port is SWTPM_PORT+1).
#
# Why the resource manager stays up (measured, see docs/tokens.md): a TPM holds only ~3 loaded
# objects. Straight on swtpm, tpm2_ptool fails with "out of memory for object contexts", and the
# PKCS#11 module can use just one key per process (the second key generation fails the same way);
# swtpm also serves one TCP client at a time. tpm2-abrmd swaps objects in and out and multiplexes
# clients, like the kernel's /dev/tpmrm0 does for a real TPM.
set -euo pipefail

DIR=${1:?usage: start-swtpm.sh DIR}
LABEL=${TPM_LABEL:-tpmtok}
PIN=${TPM_PIN:-1234}
SO_PIN=${TPM_SO_PIN:-5678}
PORT=${SWTPM_PORT:-2321}
CTRL_PORT=$((PORT + 1))

for tool in swtpm tpm2_ptool tpm2-abrmd dbus-daemon; do
    command -v "$tool" >/dev/null || {
        echo "start-swtpm.sh: $tool is missing; install swtpm swtpm-tools tpm2-tools tpm2-abrmd" \
             "libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus." >&2
        exit 1
    }
done

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [[ -e "$DIR/swtpm.pid" ]] && kill -0 "$(cat "$DIR/swtpm.pid")" 2>/dev/null; then
    echo "start-swtpm.sh: a swtpm from $DIR is already running (pid $(cat "$DIR/swtpm.pid"));" \
         "stop it with stop-swtpm.sh $DIR." >&2
    exit 1
fi
mkdir -p "$DIR/state" "$DIR/store"

OK=""
cleanup() {
    # On failure, stop whatever was started, by the pids recorded (never by process name).
    if [[ -z "$OK" ]]; then
        for name in abrmd dbus swtpm; do
            if [[ -e "$DIR/$name.pid" ]]; then
                kill "$(cat "$DIR/$name.pid")" 2>/dev/null || true
                rm -f "$DIR/$name.pid"
            fi
        done
    fi
}
trap cleanup EXIT

swtpm socket --tpm2 --daemon \
    --server "type=tcp,port=$PORT,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$CTRL_PORT,bindaddr=127.0.0.1" \
    --tpmstate "dir=$DIR/state" --flags not-need-init,startup-clear \
    --pid "file=$DIR/swtpm.pid" --log "file=$DIR/swtpm.log"

# A private session bus: nothing else on the machine can reach this TPM through it.
dbus-daemon --session --fork --print-address=1 --print-pid=1 > "$DIR/dbus.out"
sed -n 2p "$DIR/dbus.out" > "$DIR/dbus.pid"
export DBUS_SESSION_BUS_ADDRESS
DBUS_SESSION_BUS_ADDRESS=$(sed -n 1p "$DIR/dbus.out")

tpm2-abrmd --session --allow-root --flush-all --tcti="swtpm:host=127.0.0.1,port=$PORT" \
    >"$DIR/abrmd.log" 2>&1 &
echo $! > "$DIR/abrmd.pid"

export TPM2TOOLS_TCTI=tabrmd:bus_type=session TPM2_PKCS11_STORE="$DIR/store"
# abrmd needs a moment to claim its bus name; tpm2_ptool fails until it has.
PRIMARY=""
for _ in $(seq 100); do
    if PRIMARY=$(tpm2_ptool init 2>/dev/null); then break; fi
    PRIMARY=""
    sleep 0.1
done
[[ -n "$PRIMARY" ]] || { echo "start-swtpm.sh: tpm2_ptool init failed (see $DIR/abrmd.log)." >&2; exit 1; }
PID_ID=$(printf '%s\n' "$PRIMARY" | sed -n 's/^id: *//p')
tpm2_ptool addtoken --pid="$PID_ID" --label="$LABEL" --sopin="$SO_PIN" --userpin="$PIN" >/dev/null

MODULE=""
for candidate in /usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so /usr/lib/*/pkcs11/libtpm2_pkcs11.so \
                 /usr/lib/pkcs11/libtpm2_pkcs11.so; do
    [[ -e "$candidate" ]] && { MODULE=$candidate; break; }
done

cat > "$DIR/tpm.env" <<ENV
export DBUS_SESSION_BUS_ADDRESS='$DBUS_SESSION_BUS_ADDRESS'
export TPM2_PKCS11_TCTI='tabrmd:bus_type=session'
export TPM2TOOLS_TCTI='tabrmd:bus_type=session'
export TPM2_PKCS11_STORE='$DIR/store'
export TPM2_PKCS11_MODULE='$MODULE'
ENV
OK=1
echo "swtpm (pid $(cat "$DIR/swtpm.pid"), port $PORT) with tpm2-abrmd (pid $(cat "$DIR/abrmd.pid"));" \
     "token '$LABEL' created. Use: . $DIR/tpm.env"
