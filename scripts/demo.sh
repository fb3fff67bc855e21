#!/usr/bin/env bash
# The whole system on one machine, on embedded defaults (run scripts/setup.sh first):
#   SoftHSM viewer token -> enrolled viewer -> Archiver -> camera (ffmpeg HLS PUT) -> live view
#   and export with fusion-client -> verification of the decrypted video with ffmpeg.
# Everything lives in ./demo-data (recreated on every run). The Archiver is stopped on exit,
# unless --serve is given: then it keeps running until Ctrl-C so the printed commands work.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
# FUSION_DEMO_VENV: another virtualenv than .venv (for developers who keep it elsewhere).
BIN="${FUSION_DEMO_VENV:-$ROOT/.venv}/bin"
DEMO="$ROOT/demo-data"
SECONDS_OF_VIDEO=30
KEY_PERIOD=10          # seconds per minute key: short, so the demo shows key rotation
SERVE=0
[ "${1:-}" = "--serve" ] && SERVE=1

if [ -t 2 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
say() { printf '%sdemo:%s %s\n' "$BOLD" "$PLAIN" "$*" >&2; }
die() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }

[ -x "$BIN/fusion-client" ] || die "no virtualenv in .venv; run scripts/setup.sh first."
for tool in ffmpeg softhsm2-util; do
  command -v "$tool" >/dev/null || die "$tool is not installed; run scripts/setup.sh first."
done

rm -rf "$DEMO"
mkdir -p "$DEMO"
PORT="$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
ARCHIVER_DATA="$DEMO/archiver"
SERVER_PID=""
LIVE_PID=""
cleanup() {
  [ -n "$LIVE_PID" ] && kill "$LIVE_PID" 2>/dev/null || true
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -INT "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    say "Archiver stopped."
  fi
}
trap cleanup EXIT

# --- 1. the viewer's token and identity ---------------------------------------------------
# SoftHSM stands in for a smartcard/TPM here (docs/tokens.md). The PIN reaches the tools through
# FUSION_PIN, never through a file or the command line of fusion-client.
say "1/8 creating a SoftHSM token 'viewers' and enrolling viewer 'alice' (key generated on the token)"
"$BIN/fusion-keys" softhsm-init --dir "$DEMO/viewer-token" --label viewers --pin 1234 \
  --so-pin 5678 >/dev/null 2>&1 || die "fusion-keys softhsm-init failed"
export SOFTHSM2_CONF="$DEMO/viewer-token/softhsm2.conf"
export FUSION_PIN=1234
export FUSION_CLIENT_HOME="$DEMO/client-home"   # the viewer's known Archivers (pins)
TOKEN="pkcs11:token=viewers;object=alice"
"$BIN/fusion-keys" enroll --token "$TOKEN" --output "$DEMO/alice.pem" >&2

# --- 2. the Archiver ----------------------------------------------------------------------
say "2/8 starting the Archiver on $URL (data in demo-data/archiver, key period ${KEY_PERIOD} s)"
# The Archiver creates its own SoftHSM token in its data directory; it must not see the viewer's.
env -u SOFTHSM2_CONF -u FUSION_PIN "$BIN/fusion-archiver" serve --data "$ARCHIVER_DATA" \
  --port "$PORT" --key-period "$KEY_PERIOD" >"$DEMO/archiver.log" 2>&1 &
SERVER_PID=$!
"$BIN/python" - "$URL" "$SERVER_PID" <<'EOF' || die "the Archiver did not start; see demo-data/archiver.log"
import os, sys, time, httpx
url, pid = sys.argv[1], int(sys.argv[2])
for _ in range(300):
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        if httpx.get(url + "/healthz", timeout=1).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.1)
sys.exit(1)
EOF
# What an admin hands to viewers out of band: the Archiver's certificate, to pin.
"$BIN/python" - "$URL" "$DEMO/archiver.pem" <<'EOF'
import sys, httpx
info = httpx.get(sys.argv[1] + "/v1/archiver", timeout=10).json()
open(sys.argv[2], "w").write(info["certificate"])
print(f"demo: Archiver certificate sha256 {info['fingerprint']} -> demo-data/archiver.pem",
      file=sys.stderr)
EOF

# --- 3. a camera and an authorized viewer -------------------------------------------------
say "3/8 adding camera cam1 and authorizing alice on it"
ADMIN=(--archiver "$URL" --data "$ARCHIVER_DATA")
CAMERA_JSON="$("$BIN/fusion-archiver" cameras add cam1 --json "${ADMIN[@]}")"
INGEST_TOKEN="$(printf '%s' "$CAMERA_JSON" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["ingest_token"])')"
INGEST_URL="$(printf '%s' "$CAMERA_JSON" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["ingest_url"])')"
"$BIN/fusion-archiver" clients add "$DEMO/alice.pem" --cameras cam1 "${ADMIN[@]}" >&2

# --- 4. the camera: a generated H.264 stream pushed with ffmpeg's HLS muxer (PUT) ----------
say "4/8 generating ${SECONDS_OF_VIDEO} s of H.264 test video"
ffmpeg -nostdin -hide_banner -loglevel error -y -f lavfi \
  -i "testsrc2=size=640x360:rate=25" -t "$SECONDS_OF_VIDEO" -c:v libx264 -preset ultrafast \
  -g 25 -keyint_min 25 -sc_threshold 0 -pix_fmt yuv420p -f mpegts "$DEMO/source.ts"
START="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "5/8 pushing it in real time (${SECONDS_OF_VIDEO} s) while alice watches live for 12 s"
# Live viewing while the camera pushes: decrypted segments arrive as they are archived.
"$BIN/fusion-client" live --archiver "$URL" --token "$TOKEN" --camera cam1 --duration 12 \
  --archiver-cert "$DEMO/archiver.pem" -o "$DEMO/live.ts" 2>"$DEMO/live.log" &
LIVE_PID=$!
sleep 1
ffmpeg -nostdin -hide_banner -loglevel error -re -i "$DEMO/source.ts" -c copy -f hls \
  -hls_time 2 -hls_list_size 5 -method PUT \
  -headers "Authorization: Bearer $INGEST_TOKEN"$'\r\n' "$INGEST_URL" \
  || die "ffmpeg could not push to the Archiver; see demo-data/archiver.log"
if wait "$LIVE_PID"; then
  LIVE_PID=""
  sed 's/^/  /' "$DEMO/live.log" >&2
else
  LIVE_PID=""
  cat "$DEMO/live.log" >&2
  die "live viewing failed"
fi

# --- 5. export and verify -----------------------------------------------------------------
say "6/8 exporting the recording since $START with fusion-client play"
"$BIN/fusion-client" play --archiver "$URL" --token "$TOKEN" --camera cam1 --from "$START" \
  --to now -o "$DEMO/cam1.ts" --save-stream "$DEMO/cam1.fusion"

say "7/8 verifying the decrypted video with ffmpeg"
ffmpeg -nostdin -hide_banner -v error -i "$DEMO/cam1.ts" -f null - \
  || die "ffmpeg cannot decode the decrypted file"
"$BIN/python" - "$DEMO/source.ts" "$DEMO/cam1.ts" "$DEMO/live.ts" <<'EOF' || die "the decrypted frames differ from the camera's"
import subprocess, sys

def frames(path):
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:v",
                          "-f", "framemd5", "-"], check=True, capture_output=True, text=True)
    return [l.rsplit(",", 1)[1].strip() for l in out.stdout.splitlines()
            if l and not l.startswith("#")]

def contiguous(part, whole):
    n = len(part)
    return n > 0 and any(whole[i:i + n] == part for i in range(len(whole) - n + 1))

source, export, live = (frames(p) for p in sys.argv[1:4])
if export != source:
    sys.exit(f"demo: export has {len(export)} frames, the camera sent {len(source)}; "
             "they are not identical")
print(f"demo: export: all {len(export)} decoded frames identical to the camera's (framemd5)",
      file=sys.stderr)
if not contiguous(live, source):
    sys.exit("demo: the live recording is not a contiguous run of the camera's frames")
print(f"demo: live view: {len(live)} decoded frames, a contiguous run of the camera's",
      file=sys.stderr)
EOF

say "8/8 an evidence package of the same range, verified offline (no token, no Archiver)"
"$BIN/fusion-client" evidence export --archiver "$URL" --token "$TOKEN" --camera cam1 \
  --from "$START" --to now -o "$DEMO/case.zip" --quiet
# The signer is established against the fingerprint of archiver.pem, known out of band (without a
# trust anchor the verdict is "consistent, signer not established", exit 63).
ARCHIVER_SHA256="$(openssl x509 -in "$DEMO/archiver.pem" -noout -fingerprint -sha256 | cut -d= -f2)"
env -u SOFTHSM2_CONF -u FUSION_PIN "$BIN/fusion-client" evidence verify "$DEMO/case.zip" \
  --expect-archiver "$ARCHIVER_SHA256" -o "$DEMO/case.ts" | sed 's/^/  /' >&2 \
  || die "the evidence package did not verify"
cmp -s "$DEMO/case.ts" "$DEMO/cam1.ts" || die "the evidence package's video differs from the export"
say "evidence: the package's video is byte-identical to the export"

# Key rotation and wrapping, as the Archiver counts them (Prometheus /metrics).
"$BIN/python" - "$URL" "$ARCHIVER_DATA/metrics-token" <<'EOF'
import pathlib, sys, httpx
# /metrics is not public: the metrics token is in the data directory (mode 0600).
token = pathlib.Path(sys.argv[2]).read_text().strip()
wanted = {"fusion_key_rotations_total": "minute keys created",
          "fusion_wrapped_keys_total": "chain records (key chains wrapped for viewers)",
          "fusion_epochs_started_total": "epoch openers (RSA) written"}
for line in httpx.get(sys.argv[1] + "/metrics", timeout=10,
                      headers={"Authorization": f"Bearer {token}"}).text.splitlines():
    name, _, value = line.partition(" ")
    if name in wanted:
        print(f"demo: Archiver: {float(value):.0f} {wanted[name]}", file=sys.stderr)
EOF

cat >&2 <<EOF

demo: SUCCESS. Decrypted, verified video: $DEMO/cam1.ts
      (evidence package for a third party: $DEMO/case.zip; check it with
       fusion-client evidence verify $DEMO/case.zip --expect-archiver $ARCHIVER_SHA256)
      (live capture: $DEMO/live.ts; the encrypted, signed fusion stream: $DEMO/cam1.fusion)

Play it back:
  ffplay $DEMO/cam1.ts

In another shell, with the Archiver running (scripts/demo.sh --serve keeps it up), first:
  export SOFTHSM2_CONF=$SOFTHSM2_CONF FUSION_CLIENT_HOME=$FUSION_CLIENT_HOME FUSION_PIN=1234
Watch cam1 live (push the camera again to see something):
  $BIN/fusion-client live --archiver $URL --token '$TOKEN' --camera cam1 -o - | ffplay -
  ffmpeg -re -i $DEMO/source.ts -c copy -f hls -hls_time 2 -method PUT -headers "Authorization: Bearer $INGEST_TOKEN"\$'\\r\\n' $INGEST_URL
Play back the last ten minutes from the Archiver:
  $BIN/fusion-client play --archiver $URL --token '$TOKEN' --camera cam1 --from -10m -o - | ffplay -
Verify the saved fusion stream offline (signatures, chain, tags):
  $BIN/fusion-client open $DEMO/cam1.fusion --token '$TOKEN' --archiver-cert $DEMO/archiver.pem -o $DEMO/check.ts

Open the operator's viewer in your browser (live, timeline, export; Ctrl-C stops it):
  $BIN/fusion-client view --archiver $URL --token '$TOKEN' --archiver-cert $DEMO/archiver.pem --export-dir $DEMO/exports
EOF

if [ "$SERVE" = 1 ]; then
  say "the Archiver keeps running on $URL; Ctrl-C stops it."
  wait "$SERVER_PID" || true
fi
