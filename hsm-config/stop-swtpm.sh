#!/usr/bin/env bash
# Stop what start-swtpm.sh DIR started, by the pids it recorded (never by process name):
# tpm2-abrmd first (so it does not log a lost TPM), then its private D-Bus, then swtpm.
set -euo pipefail
DIR=${1:?usage: stop-swtpm.sh DIR}
stopped=0
for name in abrmd dbus swtpm; do
    pidfile="$DIR/$name.pid"
    [[ -e "$pidfile" ]] || continue
    pid=$(cat "$pidfile")
    if [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; then
        # Wait up to 5 s so the next start finds the ports free.
        for _ in $(seq 50); do
            # gone, or a zombie waiting for a parent that does not reap: either way it has exited
            state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)
            [[ "$state" == gone || "$state" == Z ]] && break
            sleep 0.1
        done
        stopped=$((stopped + 1))
    fi
    rm -f "$pidfile"
done
echo "stop-swtpm.sh: stopped $stopped process(es) from $DIR."
