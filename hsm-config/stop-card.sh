#!/usr/bin/env bash
# Stop what start-card.sh started in DIR: the emulated card, then pcscd, by their recorded pids
# (never by process name: other pcscd instances may be running). The card's state stays in
# DIR/card.json.
set -uo pipefail

DIR=${1:?usage: stop-card.sh DIR}
for name in card pcscd; do
    pidfile="$DIR/$name.pid"
    [[ -e "$pidfile" ]] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
done
rm -f "$DIR/card.inserted"
