#!/usr/bin/env bash
# One site on one machine (issue 21; docs/site.md explains every step). Run scripts/setup.sh first.
#   PostgreSQL (the site directory) -> a demo site CA -> three Archivers a1, a2, a3 on 127.0.0.1
#   (HTTPS, each its own data directory, signing token and TLS certificate) -> a camera pushing
#   to each -> a viewer (SoftHSM token) authorized through a1 -> a2's camera played and checked
#   frame by frame with ffmpeg -> the viewer revoked through a3 -> every Archiver refuses it.
# Files go to ./site-demo-data (FUSION_SITE_DEMO_DIR: elsewhere), recreated on every run; the
# PostgreSQL cluster to a temporary directory (run as the postgres user when this script runs as
# root: PostgreSQL refuses root). Everything started here is stopped on exit.
#
# Steps of issue 21's parts are marked `# needs: <part>` and run when <part> is in ENABLED_PARTS
# (FUSION_SITE_DEMO_PARTS overrides the default below; a part not merged yet stays out of it):
#   identity  fusion-archiver identity csr/import (signing certificates from the site CA)
#   site-ca   fusion-client --site-ca (any Archiver certificate the site CA issued; with identity)
#   registry  fusion-archiver site archivers
#   notify    a revocation through a3 ends a live stream open on a1 (LISTEN/NOTIFY)
#   routing   a camera of a2 played through a1 (redirect to the Archiver that holds the
#             range), then cameras move and the range across the move in one command
#   failover  a camera of a2 with a standby (a3); a2 killed (kill -9); a3 takes over; the range
#             across the failover played in one command (issue 22)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
BIN="${FUSION_DEMO_VENV:-$ROOT/.venv}/bin"
DEMO="${FUSION_SITE_DEMO_DIR:-$ROOT/site-demo-data}"
ENABLED_PARTS="${FUSION_SITE_DEMO_PARTS-identity site-ca registry notify routing failover}"
KEY_PERIOD=10          # seconds per key period: short, so a revocation shows within the demo
SECONDS_OF_VIDEO=12

if [ -t 2 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
say() { printf '%ssite-demo:%s %s\n' "$BOLD" "$PLAIN" "$*" >&2; }
die() { printf 'site-demo: FAILED: %s\n' "$*" >&2; exit 1; }
enabled() { case " $ENABLED_PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
needs() {  # needs PART: true if PART is enabled, else says which step is left out
  enabled "$1" && return 0
  say "  (skipped: needs '$1', not merged yet)"
  return 1
}

[ -x "$BIN/fusion-client" ] || die "no virtualenv in .venv; run scripts/setup.sh first."
for tool in ffmpeg softhsm2-util openssl; do
  command -v "$tool" >/dev/null || die "$tool is not installed; run scripts/setup.sh first."
done
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -x "$PGBIN/initdb" ] || die "PostgreSQL is not installed (Debian package 'postgresql'); run scripts/setup.sh first."

rm -rf "$DEMO"
mkdir -p "$DEMO"
free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PGROOT=""
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true   # Archivers stop cleanly on it, as under systemd
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$PGROOT" ]; then
    [ -f "$PGROOT/data/postmaster.pid" ] && pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -m fast -w stop >/dev/null 2>&1
    rm -rf "$PGROOT"
  fi
  [ ${#PIDS[@]} -gt 0 ] && say "stopped the Archivers, the cameras and PostgreSQL." || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # a stopped demo cleans up too (the EXIT trap runs)

# --- 1. PostgreSQL: the site directory ----------------------------------------------------
# A site uses its existing PostgreSQL server; the demo makes a throwaway cluster. As root, it
# runs as the postgres user (initdb refuses root) in a directory that user owns.
say "1/9 starting PostgreSQL ($PGBIN) and creating the site's role and database"
PGROOT="$(mktemp -d /tmp/fusion-site-demo-pg.XXXXXX)"
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$PGROOT"
  pg() { runuser -u postgres -- "$@"; }
else
  pg() { "$@"; }
fi
PGPORT="$(free_port)"
say "  PostgreSQL cluster in $PGROOT, port $PGPORT"
# Local (socket) connections: trust, in a directory only the cluster's user reaches; TCP: passwords.
pg "$PGBIN/initdb" -D "$PGROOT/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  -E UTF8 --locale=C >"$DEMO/initdb.log" 2>&1 || die "initdb failed; see $DEMO/initdb.log"
pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/log" -w -o \
  "-c listen_addresses=127.0.0.1 -p $PGPORT -c unix_socket_directories=$PGROOT" start >/dev/null \
  || die "PostgreSQL did not start: $(tail -5 "$PGROOT/log" 2>/dev/null)"
SITE_PASSWORD="$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(18))')"
# The role owns only its database: the Archivers need nothing else from the server.
pg "$PGBIN/psql" -q -v ON_ERROR_STOP=1 -h "$PGROOT" -p "$PGPORT" -U postgres -d postgres \
  -v pw="$SITE_PASSWORD" >/dev/null <<'SQL' || die "could not create the site's role and database"
CREATE ROLE fusion_site LOGIN PASSWORD :'pw';
CREATE DATABASE fusion_site OWNER fusion_site;
REVOKE ALL ON DATABASE fusion_site FROM PUBLIC;
SQL
# In the Archivers' environment, not on their command lines (ps shows argv to every user).
DIRECTORY_URL="postgresql://fusion_site:$SITE_PASSWORD@127.0.0.1:$PGPORT/fusion_site"
say "  directory: postgresql://fusion_site:***@127.0.0.1:$PGPORT/fusion_site"

# --- 2. the site CA and the Archivers' TLS certificates -----------------------------------
say "2/9 making a demo site CA and a TLS certificate for each of a1, a2, a3 (openssl)"
CA="$DEMO/ca"
mkdir -p "$CA"
chmod 700 "$CA"
openssl req -x509 -newkey rsa:3072 -nodes -keyout "$CA/site-ca.key" -out "$CA/site-ca.pem" \
  -days 3650 -subj "/O=Demo Site/CN=Demo Site CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null || die "openssl could not make the CA"
export FUSION_TLS_CA="$CA/site-ca.pem"   # every HTTPS call below verifies against it
# sign_cert CSR OUT EXTENSIONS: what the site CA does with a request it approved.
sign_cert() {
  openssl x509 -req -in "$1" -CA "$CA/site-ca.pem" -CAkey "$CA/site-ca.key" -CAcreateserial \
    -days 30 -out "$2" -extfile <(printf '%s\n' "$3" "authorityKeyIdentifier=keyid" \
    "subjectKeyIdentifier=hash") 2>/dev/null
}
for a in a1 a2 a3; do
  mkdir -p "$DEMO/$a-tls"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$DEMO/$a-tls/tls.key" \
    -out "$DEMO/$a-tls/tls.csr" -subj "/O=Demo Site/CN=$a" 2>/dev/null
  sign_cert "$DEMO/$a-tls/tls.csr" "$DEMO/$a-tls/tls.crt" "$(printf '%s\n' \
    'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
    'extendedKeyUsage=serverAuth' 'subjectAltName=IP:127.0.0.1,DNS:localhost')" \
    || die "the CA could not sign $a's TLS certificate"
done

# --- 3. three Archivers, one directory ------------------------------------------------------
say "3/9 starting Archivers a1, a2, a3 (key period ${KEY_PERIOD} s), all on the same directory"
declare -A URL PORT APID
for a in a1 a2 a3; do
  PORT[$a]="$(free_port)"
  URL[$a]="https://127.0.0.1:${PORT[$a]}"
done
# start_archiver A: serve A on its port, wait until it answers, save its signing certificate.
start_archiver() {
  local a="$1" pid
  # The Archiver makes its own SoftHSM signing token in its data directory.
  env -u SOFTHSM2_CONF -u FUSION_PIN FUSION_DIRECTORY="$DIRECTORY_URL" \
    "$BIN/fusion-archiver" serve --data "$DEMO/$a" --name "$a" --public-url "${URL[$a]}" \
    --port "${PORT[$a]}" --tls-cert "$DEMO/$a-tls/tls.crt" --tls-key "$DEMO/$a-tls/tls.key" \
    --key-period "$KEY_PERIOD" >>"$DEMO/$a.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  APID[$a]=$pid
  "$BIN/python" - "${URL[$a]}" "$pid" "$DEMO/$a.pem" <<'EOF' || die "Archiver $a did not start; see $DEMO/$a.log"
import os, ssl, sys, time, httpx
url, pid, pem = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ca = ssl.create_default_context(cafile=os.environ["FUSION_TLS_CA"])  # the site CA only
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        if httpx.get(url + "/healthz", timeout=2, verify=ca).status_code == 200:
            # Its signing certificate, as an admin hands it to viewers to pin.
            info = httpx.get(url + "/v1/archiver", timeout=10, verify=ca).json()
            open(pem, "w").write(info["certificate"])
            print(f"site-demo:   {url}: signing certificate sha256 {info['fingerprint'][:16]}...",
                  file=sys.stderr)
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
sys.exit(1)
EOF
}
# stop_archiver A: as a service manager does (SIGTERM: a clean stop).
stop_archiver() {
  kill -TERM "${APID[$1]}" 2>/dev/null || true
  wait "${APID[$1]}" 2>/dev/null || true
}
# needs: identity -- each Archiver's signing key certified by the site CA: a CSR made on its
# token (the key never leaves it), signed by the CA, imported; serve then uses that certificate.
IDENTITY=0
needs identity && IDENTITY=1
for a in a1 a2 a3; do
  if [ "$IDENTITY" = 1 ]; then
    env -u SOFTHSM2_CONF -u FUSION_PIN "$BIN/fusion-archiver" identity csr --data "$DEMO/$a" \
      --name "$a" -o "$DEMO/$a-signing.csr" >&2 || die "identity csr failed on $a"
    sign_cert "$DEMO/$a-signing.csr" "$DEMO/$a-signing.pem" "$(printf '%s\n' \
      'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature')" \
      || die "the CA could not sign $a's signing certificate"
    env -u SOFTHSM2_CONF -u FUSION_PIN "$BIN/fusion-archiver" identity import --data "$DEMO/$a" \
      --site-ca "$CA/site-ca.pem" "$DEMO/$a-signing.pem" >&2 || die "identity import failed on $a"
  fi
  start_archiver "$a"
done
# needs: registry -- the site's Archivers as the directory knows them.
if needs registry; then
  "$BIN/fusion-archiver" site archivers --archiver "${URL[a1]}" --data "$DEMO/a1" >&2 \
    || die "site archivers failed"
fi

# --- 4. a camera on each Archiver -----------------------------------------------------------
say "4/9 adding camera cam-aN through each Archiver aN (it records it; the ingest URL is aN's)"
declare -A INGEST_URL INGEST_TOKEN
for a in a1 a2 a3; do
  json="$("$BIN/fusion-archiver" cameras add "cam-$a" --json --archiver "${URL[$a]}" \
    --data "$DEMO/$a")" || die "cameras add cam-$a failed"
  INGEST_URL[$a]="$(printf '%s' "$json" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["ingest_url"])')"
  INGEST_TOKEN[$a]="$(printf '%s' "$json" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["ingest_token"])')"
done
"$BIN/fusion-archiver" cameras list --archiver "${URL[a3]}" --data "$DEMO/a3" 2>&1 \
  | sed 's/^/  a3 lists: /' >&2

# --- 5. a viewer, authorized through a1 -----------------------------------------------------
say "5/9 a SoftHSM token with viewer 'alice'; authorized through a1 on the three cameras"
"$BIN/fusion-keys" softhsm-init --dir "$DEMO/viewer-token" --label viewers --pin 1234 \
  --so-pin 5678 >/dev/null 2>&1 || die "fusion-keys softhsm-init failed"
export SOFTHSM2_CONF="$DEMO/viewer-token/softhsm2.conf"
export FUSION_PIN=1234
export FUSION_CLIENT_HOME="$DEMO/client-home"
TOKEN="pkcs11:token=viewers;object=alice"
"$BIN/fusion-keys" enroll --token "$TOKEN" --output "$DEMO/alice.pem" >/dev/null 2>&1 \
  || die "fusion-keys enroll failed"
"$BIN/fusion-archiver" viewers add "$DEMO/alice.pem" --cameras cam-a1,cam-a2,cam-a3 \
  --archiver "${URL[a1]}" --data "$DEMO/a1" 2>&1 | sed 's/^/  /' >&2
# a2 and a3 wrap keys for the viewers they know: an authorization made through a1 reaches their
# key managers at their next start, until 'notify' pushes it to them at once.
if ! enabled notify; then
  say "  restarting a2 and a3, which read a viewer list changed elsewhere only at start (needs: notify)"
  for a in a2 a3; do
    stop_archiver "$a"
    start_archiver "$a"
  done
fi

# How alice trusts the Archivers' signatures. Today: each Archiver's signing certificate,
# handed to her out of band, pinned once (a first call to each). With 'site-ca': any signing
# certificate the site CA issued, no pin.
# trust_args A: the client's options for Archiver A, in TRUST.
trust_args() {
  if enabled site-ca; then TRUST=(--site-ca "$CA/site-ca.pem"); else TRUST=(--archiver-cert "$DEMO/$1.pem"); fi
}
if enabled site-ca; then
  say "  alice trusts any Archiver signing certificate the site CA issued (--site-ca)"
else
  say "  alice pins each Archiver's signing certificate (needs: site-ca, to trust the site CA instead)"
  for a in a1 a2 a3; do
    trust_args "$a"
    "$BIN/fusion-client" cameras --archiver "${URL[$a]}" --token "$TOKEN" "${TRUST[@]}" \
      >/dev/null 2>"$DEMO/pin-$a.log" || die "alice could not reach $a: $(cat "$DEMO/pin-$a.log")"
  done
fi

# --- 6. the cameras push ----------------------------------------------------------------------
say "6/9 the three cameras push ${SECONDS_OF_VIDEO} s of H.264 each, in real time, to their Archivers"
ffmpeg -nostdin -hide_banner -loglevel error -y -f lavfi -i "testsrc2=size=320x240:rate=25" \
  -t "$SECONDS_OF_VIDEO" -c:v libx264 -preset ultrafast -g 25 -keyint_min 25 -sc_threshold 0 \
  -pix_fmt yuv420p -f mpegts "$DEMO/source.ts"
START="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# push A: ffmpeg's HLS muxer with PUT, as docs/cameras.md (it checks no TLS certificate: a camera
# host uses the forwarder of deploy/ in production).
# push_cmd INGEST_URL TOKEN: the camera's command in PUSH (run as "${PUSH[@]}", so that a
# camera in the background is ffmpeg's own process, which the cleanup can stop).
push_cmd() {
  PUSH=(ffmpeg -nostdin -hide_banner -loglevel error -re -i "$DEMO/source.ts" -c copy -f hls
        -hls_time 2 -hls_list_size 5 -method PUT -headers "Authorization: Bearer $2"$'\r\n' "$1")
}
CAMERA_PIDS=()
for a in a1 a2 a3; do
  push_cmd "${INGEST_URL[$a]}" "${INGEST_TOKEN[$a]}"
  "${PUSH[@]}" 2>"$DEMO/push-$a.log" &
  CAMERA_PIDS+=($!)
  PIDS+=($!)
done
for pid in "${CAMERA_PIDS[@]}"; do
  wait "$pid" || die "a camera could not push; see $DEMO/push-*.log"
done
SEGMENTS="$(( (SECONDS_OF_VIDEO + 1) / 2 ))"
# wait_segments A:CAMERA...: until each Archiver A holds $SEGMENTS segments of CAMERA in its own
# index (each Archiver counts what it recorded), at most a minute.
wait_segments() {
  "$BIN/python" - "$SEGMENTS" "$DEMO" "${URL[a1]}" "${URL[a2]}" "${URL[a3]}" "$@" <<'EOF'
import os, ssl, sys, time, httpx
want, demo = int(sys.argv[1]), sys.argv[2]
urls = dict(zip(("a1", "a2", "a3"), sys.argv[3:6]))
pairs = [arg.split(":", 1) for arg in sys.argv[6:]]
ca = ssl.create_default_context(cafile=os.environ["FUSION_TLS_CA"])

def count(a, camera):
    token = open(f"{demo}/{a}/admin-token").read().strip()
    cams = httpx.get(urls[a] + "/v1/admin/cameras", timeout=30, verify=ca,
                     headers={"Authorization": f"Bearer {token}"}).json()
    return next(c["segments"] for c in cams if c["name"] == camera)

deadline = time.monotonic() + 60
while True:
    counts = {f"{camera} on {a}": count(a, camera) for a, camera in pairs}
    if all(v >= want for v in counts.values()) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("site-demo:   segments archived: " + ", ".join(f"{n} {v}" for n, v in counts.items()),
      file=sys.stderr)
sys.exit(0 if all(v >= want for v in counts.values()) else 1)
EOF
}
wait_segments a1:cam-a1 a2:cam-a2 a3:cam-a3 || die "not every segment was archived"

# --- 7. alice plays a2's camera -----------------------------------------------------------------
say "7/9 alice plays cam-a2 from a2 (authorized through a1: the directory is one) and ffmpeg checks it"
trust_args a2
"$BIN/fusion-client" play --archiver "${URL[a2]}" --token "$TOKEN" --camera cam-a2 \
  --from "$START" --to now "${TRUST[@]}" -o "$DEMO/cam-a2.ts" \
  || die "alice could not play cam-a2 from a2"
# frames_equal A B: every decoded frame of A equals B's, in order (ffmpeg's framemd5).
frames_equal() {
  "$BIN/python" - "$@" <<'EOF'
import subprocess, sys
def frames(path):
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:v",
                          "-f", "framemd5", "-"], check=True, capture_output=True, text=True)
    return [l.rsplit(",", 1)[1].strip() for l in out.stdout.splitlines() if l and l[0] != "#"]
played, *sources = sys.argv[1:]
want = [h for s in sources for h in frames(s)]
got = frames(played)
if got != want:
    sys.exit(f"site-demo: {played}: {len(got)} frames, expected the camera's {len(want)}; not identical")
print(f"site-demo:   all {len(got)} decoded frames identical to the camera's (framemd5)",
      file=sys.stderr)
EOF
}
frames_equal "$DEMO/cam-a2.ts" "$DEMO/source.ts" || die "the decrypted frames differ from the camera's"

# needs: routing -- the same camera through a1: a1 redirects to a2, which holds the range; the
# client follows only to an Archiver the site lists whose signing certificate it trusts.
trust_args a1
if needs routing; then
  "$BIN/fusion-client" play --archiver "${URL[a1]}" "${TRUST[@]}" --token "$TOKEN" \
    --camera cam-a2 --from "$START" --to now -o "$DEMO/cam-a2-via-a1.ts" \
    || die "alice could not play cam-a2 through a1"
  frames_equal "$DEMO/cam-a2-via-a1.ts" "$DEMO/source.ts" || die "cam-a2 through a1 differs"
fi

# needs: routing -- cam-a2 moves to a3; its history stays on a2; the camera pushes to a3 now;
# one play through a1 covers both parts, each verified against its own signer.
if enabled routing; then
  "$BIN/fusion-archiver" cameras move cam-a2 --to a3 --archiver "${URL[a1]}" --data "$DEMO/a1" >&2 \
    || die "cameras move failed"
  # The camera's operator points it at a3 (a push to a2 is refused now, naming a3).
  push_cmd "${URL[a3]}/ingest/cam-a2/index.m3u8" "${INGEST_TOKEN[a2]}"
  "${PUSH[@]}" 2>"$DEMO/push-moved.log" || die "cam-a2 could not push to a3 after the move; see $DEMO/push-moved.log"
  wait_segments a3:cam-a2 || die "a3 did not archive cam-a2 after the move"
  "$BIN/fusion-client" play --archiver "${URL[a1]}" "${TRUST[@]}" --token "$TOKEN" \
    --camera cam-a2 --from "$START" --to now -o "$DEMO/cam-a2-moved.ts" \
    || die "alice could not play cam-a2 across the move"
  frames_equal "$DEMO/cam-a2-moved.ts" "$DEMO/source.ts" "$DEMO/source.ts" \
    || die "cam-a2 across the move differs from what the camera sent (twice)"
fi

# needs: failover -- cam-fo is recorded by a2 with a3 as its standby. a2 dies (kill -9): a3 takes
# the camera's lease in PostgreSQL and accepts its pushes (the camera has both ingest URLs); a2,
# started again, stays a standby. One play covers both parts, each verified against its signer.
if needs failover; then
  json="$("$BIN/fusion-archiver" cameras add cam-fo --archivers a2,a3 --json \
    --archiver "${URL[a1]}" --data "$DEMO/a1")" || die "cameras add cam-fo --archivers a2,a3 failed"
  FO_TOKEN="$(printf '%s' "$json" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["ingest_token"])')"
  "$BIN/fusion-archiver" viewers cameras "$DEMO/alice.pem" --add cam-fo --archiver "${URL[a1]}" \
    --data "$DEMO/a1" >/dev/null || die "could not authorize alice on cam-fo"
  say "  cam-fo: recorded by a2, standby a3; alice may watch it; it pushes ${SECONDS_OF_VIDEO} s to a2"
  push_cmd "${URL[a2]}/ingest/cam-fo/index.m3u8" "$FO_TOKEN"
  "${PUSH[@]}" 2>"$DEMO/push-fo.log" || die "cam-fo could not push to a2; see $DEMO/push-fo.log"
  wait_segments a2:cam-fo || die "a2 did not archive cam-fo"
  say "  kill -9 of a2"
  kill -KILL "${APID[a2]}"
  wait "${APID[a2]}" 2>/dev/null || true
  # The takeover time: from the kill until a3 accepts cam-fo's pushes (it holds the lease).
  "$BIN/python" - "${URL[a3]}" "$FO_TOKEN" <<'EOF' || die "a3 did not take cam-fo over"
import os, ssl, sys, time, httpx
url, token = sys.argv[1:3]
ca = ssl.create_default_context(cafile=os.environ["FUSION_TLS_CA"])
killed = time.monotonic()
while time.monotonic() < killed + 60:
    answer = httpx.put(f"{url}/ingest/cam-fo/index.m3u8", content=b"#EXTM3U\n", timeout=30,
                       verify=ca, headers={"Authorization": f"Bearer {token}"})
    if answer.status_code < 300:
        print(f"site-demo:   a3 took cam-fo over {time.monotonic() - killed:.1f} s after a2 "
              "died (its lease lock in PostgreSQL was freed with a2's session)", file=sys.stderr)
        sys.exit(0)
    time.sleep(0.1)
sys.exit(1)
EOF
  push_cmd "${URL[a3]}/ingest/cam-fo/index.m3u8" "$FO_TOKEN"
  "${PUSH[@]}" 2>"$DEMO/push-fo-a3.log" || die "cam-fo could not push to a3; see $DEMO/push-fo-a3.log"
  wait_segments a3:cam-fo || die "a3 did not archive cam-fo after the takeover"
  start_archiver a2
  say "  a2 is back and stays a standby (the rule: stay; 'cameras move' moves it back):"
  "$BIN/fusion-archiver" cameras list --archiver "${URL[a2]}" --data "$DEMO/a2" 2>&1 \
    | grep '^cam-fo' | sed 's/^/  a2 lists: /' >&2
  trust_args a1
  "$BIN/fusion-client" play --archiver "${URL[a1]}" "${TRUST[@]}" --token "$TOKEN" \
    --camera cam-fo --from "$START" --to now -o "$DEMO/cam-fo.ts" 2>"$DEMO/play-fo.log" \
    || die "alice could not play cam-fo across the failover: $(cat "$DEMO/play-fo.log")"
  grep -E "part [0-9] of|switch from" "$DEMO/play-fo.log" | sed 's/^fusion-client: /  /' >&2
  frames_equal "$DEMO/cam-fo.ts" "$DEMO/source.ts" "$DEMO/source.ts" \
    || die "cam-fo across the failover differs from what the camera sent (to a2, then to a3)"
fi

# --- 8. revoked through a3 -----------------------------------------------------------------------
say "8/9 revoking alice through a3"
LIVE_PID=""
# needs: notify -- a live stream of alice's open on a1 while a camera pushes: the revocation
# made through a3 reaches a1 (LISTEN/NOTIFY) and ends it within one key period.
if needs notify; then
  trust_args a1
  "$BIN/fusion-client" live --archiver "${URL[a1]}" --token "$TOKEN" --camera cam-a1 \
    --duration 120 "${TRUST[@]}" -o "$DEMO/live-a1.ts" 2>"$DEMO/live-a1.log" &
  LIVE_PID=$!
  push_cmd "${INGEST_URL[a1]}" "${INGEST_TOKEN[a1]}"
  "${PUSH[@]}" 2>/dev/null &
  CAMERA_PIDS=($!)
  PIDS+=("$LIVE_PID" "${CAMERA_PIDS[0]}")
  # Until alice's live view shows verified video (the client writes FILE.partial until the end).
  for _ in $(seq 1 120); do
    [ -s "$DEMO/live-a1.ts.partial" ] && break
    sleep 0.5
  done
  [ -s "$DEMO/live-a1.ts.partial" ] || die "alice's live stream on a1 showed no video: $(cat "$DEMO/live-a1.log")"
fi
REVOKED_AT="$(date +%s)"
"$BIN/fusion-archiver" viewers revoke "$DEMO/alice.pem" --yes --archiver "${URL[a3]}" \
  --data "$DEMO/a3" 2>&1 | sed 's/^/  /' >&2
if [ -n "$LIVE_PID" ]; then
  for _ in $(seq 1 $(( 4 * KEY_PERIOD ))); do
    kill -0 "$LIVE_PID" 2>/dev/null || break
    sleep 0.5
  done
  kill -0 "$LIVE_PID" 2>/dev/null && die "alice's live stream on a1 still runs 2 key periods after the revocation"
  say "  alice's live stream on a1 ended $(( $(date +%s) - REVOKED_AT )) s after the revocation through a3"
fi

# --- 9. every Archiver refuses her ---------------------------------------------------------------
say "9/9 every Archiver refuses alice now"
for a in a1 a2 a3; do
  trust_args "$a"
  if "$BIN/fusion-client" play --archiver "${URL[$a]}" --token "$TOKEN" --camera "cam-$a" \
      --from "$START" --to now "${TRUST[@]}" -o "$DEMO/refused-$a.ts" --quiet \
      2>"$DEMO/refused-$a.log"; then
    die "$a still served alice after her revocation"
  fi
  grep -qi "revoked" "$DEMO/refused-$a.log" || die "$a refused alice, but not as revoked: $(cat "$DEMO/refused-$a.log")"
  say "  $a: $(grep -i -m1 "revoked" "$DEMO/refused-$a.log")"
done

say "SUCCESS: three Archivers, one directory; authorized through a1, played from a2, revoked through a3, refused by all."
