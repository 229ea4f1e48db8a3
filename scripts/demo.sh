#!/usr/bin/env bash
# A guided tour: set up, start a private sandboxd, create a sandbox, run
# commands in it, pause/resume it, remove it and stop the daemon again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sandboxd-demo.XXXXXX")
SOCK=$tmp/sandboxd.sock
LOG=$tmp/sandboxd.log
export SANDBOXD_STATE_DIR=$tmp/state
CTL=(.venv/bin/sandboxctl --socket "$SOCK")
daemon_pid=
sb_id=

# Print an argv the way one would type it, then run it.
show() {
    local out='' a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            out+=" $a"
        else
            out+=" '${a//\'/\'\\\'\'}'"
        fi
    done
    printf '\n$%s\n' "$out"
}
ctl() { show sandboxctl "$@"; "${CTL[@]}" "$@"; }

log_tail() {
    printf '\n--- last 30 lines of the daemon log (%s) ---\n' "$LOG" >&2
    tail -n 30 "$LOG" >&2 || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$sb_id" ]; then
        echo "demo: removing sandbox $sb_id" >&2
        "${CTL[@]}" rm -f "$sb_id" >/dev/null 2>&1 \
            || docker rm -f "sandboxd-$sb_id" >/dev/null 2>&1 || true
    fi
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ]; then
        echo "demo: FAILED (exit $rc)" >&2
        [ -f "$LOG" ] && log_tail
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo
echo "demo: starting sandboxd on $SOCK (state in $SANDBOXD_STATE_DIR)"
.venv/bin/sandboxd serve --socket "$SOCK" >"$LOG" 2>&1 </dev/null &
daemon_pid=$!

for _ in $(seq 150); do   # up to 15 s
    "${CTL[@]}" ping >/dev/null 2>&1 && break
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        wait "$daemon_pid" && rc=0 || rc=$?
        daemon_pid=
        echo "demo: the daemon exited during start-up (status $rc)" >&2
        exit 1
    fi
    sleep 0.1
done
"${CTL[@]}" ping >/dev/null 2>&1 || { echo "demo: the daemon did not answer within 15 s" >&2; exit 1; }

ctl ping
ctl info

show sandboxctl create --ttl 120 --name "demo-$$"
sb_id=$("${CTL[@]}" create --ttl 120 --name "demo-$$")
echo "$sb_id"

# shellcheck disable=SC2016  # $(hostname) is for the shell inside the sandbox
ctl exec "$sb_id" -- sh -c 'echo hello from $(hostname); uname -a'

rc=0
ctl exec "$sb_id" -- sh -c 'echo to-stderr >&2; exit 3' || rc=$?
echo "exit code: $rc"
if [ "$rc" -ne 3 ]; then
    echo "demo: expected exit code 3 from the sandbox, got $rc" >&2
    exit 1
fi

ctl stats "$sb_id"
ctl pause "$sb_id"
ctl resume "$sb_id"
ctl ls
ctl rm "$sb_id"
sb_id=

echo
echo "demo: stopping sandboxd (SIGTERM)"
kill -TERM "$daemon_pid"
wait "$daemon_pid" && rc=0 || rc=$?
daemon_pid=
if [ "$rc" -ne 0 ]; then
    echo "demo: the daemon exited with status $rc on SIGTERM" >&2
    exit 1
fi
echo "demo: done"
