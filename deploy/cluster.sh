#!/usr/bin/env bash
# `make cluster`: three replicas of one library folder and HAProxy in front of them, on
# loopback, with deploy/haproxy.cfg as shipped (replicas on 7651-7653, HAProxy on 7650,
# its statistics on 7649), until Ctrl-C or SIGTERM; then every process is stopped with
# SIGTERM (replicas drain: running streams get --grace) and waited for.
#
# Each replica keeps its own index (one SQLite file each, as on separate machines), under
# $XDG_CACHE_HOME/musiclib/cluster/. Usage: deploy/cluster.sh [ROOT] (default: library).
set -u
root=${1:-library}
bin=${BIN:-.venv/bin}
haproxy=$(command -v haproxy || { [ -x /usr/sbin/haproxy ] && echo /usr/sbin/haproxy; })
if [ -z "$haproxy" ]; then
    echo "cluster: haproxy is not installed: sudo apt-get install haproxy (Debian/Ubuntu)," \
        "or see https://www.haproxy.org/" >&2
    exit 1
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/musiclib/cluster"
mkdir -p "$cache"
workers=()
if "$bin/musiclib" serve --help 2>/dev/null | grep -q -- "--workers"; then
    workers=(--workers 1)  # three replicas are the processes; one each
fi

# Job control: each child in its own process group, so Ctrl-C reaches only this script,
# which then stops each child once (a second signal would cut a replica's grace short).
set -m
pids=()
stop() {
    trap - INT TERM
    echo "cluster: stopping (replicas drain their streams for up to --grace)" >&2
    kill -TERM "${pids[@]}" 2>/dev/null
    wait
    echo "cluster: stopped" >&2
    exit "${1:-0}"
}
trap 'stop 0' INT TERM

for n in 1 2 3; do
    "$bin/musiclib" serve --root "$root" --host 127.0.0.1 --port "765$n" \
        --index "$cache/replica$n.sqlite" --max-per-address 0 --max-decodes-per-address 0 \
        "${workers[@]}" --log-level warning &
    pids+=($!)
done
# HAProxy starts once the replicas listen (else its first checks mark them DOWN, noisily)
for _ in $(seq 150); do
    ready=0
    for n in 1 2 3; do
        (exec 3<>"/dev/tcp/127.0.0.1/765$n") 2>/dev/null && ready=$((ready + 1))
    done
    [ "$ready" = 3 ] && break
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "cluster: a replica did not start" >&2; stop 1; }
    done
    sleep 0.1
done
"$haproxy" -db -q -f deploy/haproxy.cfg &
pids+=($!)
sleep 1
kill -0 "${pids[3]}" 2>/dev/null || { echo "cluster: haproxy did not start (7649/7650 in use?)" >&2; stop 1; }
cat <<EOF
cluster: three replicas of $root (127.0.0.1:7651-7653) behind HAProxy.
  connect:     $bin/musiclib ls --server 127.0.0.1:7650    (or MUSICLIB_SERVER=127.0.0.1:7650)
  statistics:  http://127.0.0.1:7649/  (which replica is UP, its connections)
  try:         kill one replica (kill ${pids[0]}) during a download: it resumes on another
  Ctrl-C stops everything.
EOF
wait
stop 0
