#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine (Debian's slurmctld, slurmd and munge),
# for tests/test_slurm.py and for trying `fmtrain launch slurm` locally. Needs root.
#
#   tests/slurm/cluster.sh install   apt-get install slurmctld slurmd slurm-client munge
#   tests/slurm/cluster.sh start     munged, slurmctld, `slurmd -N n1` and `slurmd -N n2`;
#                                    returns when both nodes are idle
#   tests/slurm/cluster.sh stop      stops what start started (by pid file)
#   tests/slurm/cluster.sh status    daemons and `sinfo`
#
# The nodes are declared with NodeHostname=localhost NodeAddr=127.0.0.1 and their own ports
# (tests/slurm/slurm.conf.in); "n1" and "n2" are added to /etc/hosts so that a rendezvous on
# the first node of a job resolves. start renders /etc/slurm/slurm.conf, and refuses to
# replace one that it did not write (a real cluster's). State and logs live in
# $FMTRAIN_SLURM_STATE (default /var/lib/fmtrain-slurm): slurmctld.log, slurmd-n1.log, ...
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${FMTRAIN_SLURM_STATE:-/var/lib/fmtrain-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# fmtrain-test-cluster"
NODES=(n1 n2)

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (daemons, /etc/slurm, /etc/hosts)"; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    need_root install
    if dpkg -s slurmctld slurmd slurm-client munge >/dev/null 2>&1; then
        say "already installed: $(slurmd -V)"
        return
    fi
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
    say "installed $(slurmd -V) in $((SECONDS - t0)) s"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already running"
        return
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    mkdir -p "$STATE" && touch "$STATE/munged.ours"  # stop stops only a munged that start started
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qx "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing a real cluster's configuration"
    fi
    mkdir -p /etc/slurm "$STATE/ctld"
    local cpus
    cpus="$(nproc)"
    [ "$cpus" -ge 2 ] || cpus=2
    sed -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$cpus|g" "$HERE/slurm.conf.in" > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    for node in "${NODES[@]}"; do mkdir -p "$STATE/spool-$node"; done
}

add_hosts() {
    local node
    for node in "${NODES[@]}"; do
        if ! getent hosts "$node" >/dev/null; then
            echo "127.0.0.1 $node  # fmtrain test cluster" >> /etc/hosts
        fi
    done
}

wait_idle() {
    local state
    for _ in $(seq 120); do
        state="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')"
        if [ "$state" = "n1 idle n2 idle " ]; then
            say "nodes up: $state"
            return
        fi
        sleep 0.5
    done
    sinfo -N -l || true
    die "nodes did not become idle within 60 s (logs in $STATE)"
}

start() {
    need_root start
    command -v slurmctld >/dev/null || die "slurmctld not installed; run: $0 install"
    local t0=$SECONDS
    add_hosts
    start_munge
    write_conf
    if pid_alive "$STATE/slurmctld.pid"; then
        say "slurmctld already running"
    else
        slurmctld -c
    fi
    local node
    for node in "${NODES[@]}"; do
        if pid_alive "$STATE/slurmd-$node.pid"; then
            say "slurmd $node already running"
        else
            slurmd -N "$node"
        fi
    done
    wait_idle
    say "cluster started in $((SECONDS - t0)) s"
}

stop_pidfile() {
    local name="$1" file="$2"
    if pid_alive "$file"; then
        local pid
        pid="$(cat "$file")"
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        say "stopped $name (pid $pid)"
    fi
}

stop() {
    need_root stop
    local node
    for node in "${NODES[@]}"; do stop_pidfile "slurmd $node" "$STATE/slurmd-$node.pid"; done
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    if [ -f "$STATE/munged.ours" ]; then
        stop_pidfile munged /run/munge/munged.pid
        rm -f "$STATE/munged.ours"
    fi
}

status() {
    local rc=0 node
    if pid_alive "$STATE/slurmctld.pid"; then say "slurmctld running"; else say "slurmctld not running"; rc=1; fi
    for node in "${NODES[@]}"; do
        if pid_alive "$STATE/slurmd-$node.pid"; then say "slurmd $node running"; else say "slurmd $node not running"; rc=1; fi
    done
    [ $rc = 0 ] && sinfo -N
    return $rc
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
