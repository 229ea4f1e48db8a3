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
ref=

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
    if [ -n "$ref" ]; then
        docker rmi -f "$ref" >/dev/null 2>&1 || true
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

# A warm pool of two, and a private instance name; --cleanup-on-exit removes every
# sandbox and pool member when the daemon stops at the end.
cat >"$tmp/config.toml" <<'TOML'
[[pool]]
name = "demo"
size = 2
TOML
export SANDBOXD_INSTANCE=demo-$$

echo
echo "demo: starting sandboxd on $SOCK (state in $SANDBOXD_STATE_DIR, a warm pool of 2)"
.venv/bin/sandboxd serve --socket "$SOCK" --config "$tmp/config.toml" --cleanup-on-exit \
    >"$LOG" 2>&1 </dev/null &
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
for _ in $(seq 300); do   # the pool fills in the background: up to 30 s
    "${CTL[@]}" info --json | grep -q '"ready": 2' && break
    sleep 0.1
done
ctl info

show sandboxctl create --ttl 120 --name "demo-$$"
sb_id=$("${CTL[@]}" create --ttl 120 --name "demo-$$")
# The daemon logs one JSON line per request, with the time it took.
took=$(grep '"method":"sandbox.create"' "$LOG" | tail -n 1 | sed -n 's/.*"ms":\([0-9.]*\).*/\1/p')
echo "$sb_id   (a warm-pool member: the daemon answered in ${took:-?} ms)"

# shellcheck disable=SC2016  # $(hostname) is for the shell inside the sandbox
ctl exec "$sb_id" -- sh -c 'echo hello from $(hostname); uname -a'

rc=0
ctl exec "$sb_id" -- sh -c 'echo to-stderr >&2; exit 3' || rc=$?
echo "exit code: $rc"
if [ "$rc" -ne 3 ]; then
    echo "demo: expected exit code 3 from the sandbox, got $rc" >&2
    exit 1
fi

printf 'a file from the host\n' >"$tmp/note.txt"
ctl cp "$tmp/note.txt" "$sb_id:/workspace/note.txt"
ctl exec "$sb_id" -- sh -c 'cat note.txt; id'
ctl stats "$sb_id"
ctl pause "$sb_id"
show sandboxctl snapshot "$sb_id" demo
ref=$("${CTL[@]}" snapshot "$sb_id" demo)
echo "$ref"
ctl resume "$sb_id"
show sandboxctl create --ttl 60 --image "$ref"
fork=$("${CTL[@]}" create --ttl 60 --image "$ref")
echo "$fork"
ctl exec "$fork" -- cat /workspace/note.txt
ctl ls
ctl rm "$fork" "$sb_id"
sb_id=
ctl image rm "$ref"
ref=

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
