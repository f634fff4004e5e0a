#!/usr/bin/env bash
# A real SLURM for development and tests, with accounting (sacct), a preempting partition
# and fake GPUs, on one machine: one node by default, or BUDGETLAB_SLURM_NODES=N nodes (one
# slurmd per node, `slurmd -N n1` ... `-N nN`, each on its own port). Config and state live
# in $BUDGETLAB_SLURM_DIR, never /etc/slurm.
#
#   bash slurm/cluster.sh up                 install what is missing (root), start every daemon
#   bash slurm/cluster.sh down               stop every daemon (and job step) of this cluster
#   bash slurm/cluster.sh status             daemons and sinfo
#   bash slurm/cluster.sh env                NAME=value lines: eval "$(bash slurm/cluster.sh env)"
#   bash slurm/cluster.sh kill-node NAME     a node failure: SIGKILL of NAME's slurmd and of
#                                            every job process on NAME
#   bash slurm/cluster.sh revive-node NAME   restart NAME's slurmd and resume the node
#
# Partitions: `batch` (default, PriorityTier 1, preemptable: REQUEUE) and `urgent`
# (PriorityTier 10, preempts batch). The nodes share the declared CPUs, memory and GPUs
# (more CPUs than the machine has, so several jobs run at once; slurmd trusts the config,
# SlurmdParameters=config_overrides). With one node it is named `hostname -s`; with N it is
# n1..nN (BUDGETLAB_SLURM_NODE_PREFIX), names that `up` adds to /etc/hosts (127.0.0.1) and
# `down` removes again.
# `down` and `kill-node` find this cluster's slurmstepd by the slurmd log each keeps open
# ($DIR/log/slurmd-NODE.log), so clusters with their own directory and ports run side by side.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${BUDGETLAB_SLURM_DIR:-/var/lib/budgetlab-slurm}"
CLUSTER="${BUDGETLAB_SLURM_CLUSTER:-budgetlab}"
CPUS="${BUDGETLAB_SLURM_CPUS:-16}"
GPUS="${BUDGETLAB_SLURM_GPUS:-4}"
MEM_MB="${BUDGETLAB_SLURM_MEM_MB:-32000}"
PORT_BASE="${BUDGETLAB_SLURM_PORT_BASE:-16810}"   # ctld +7, slurmd +8 (node i of N: +10+i), dbd +9, mariadb +6
NODES="${BUDGETLAB_SLURM_NODES:-1}"
PREFIX="${BUDGETLAB_SLURM_NODE_PREFIX:-n}"
NODE="$(hostname -s)"
DB_PORT=$((PORT_BASE + 6)); CTLD_PORT=$((PORT_BASE + 7)); SLURMD_PORT=$((PORT_BASE + 8))
DBD_PORT=$((PORT_BASE + 9))
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "cluster.sh: error: BUDGETLAB_SLURM_NODES=$NODES: expected a whole number >= 1" >&2; exit 2; }
if ((NODES == 1)); then NAMES=("$NODE"); else NAMES=(); for i in $(seq 1 "$NODES"); do NAMES+=("$PREFIX$i"); done; fi
# A node failure is noticed after SlurmdTimeout (+ a ping interval): short with several nodes,
# where tests kill nodes; SLURM's default on one node, where a loaded machine must not look dead.
# Measured here (kill-node until sinfo says down): ~30 s with 10, 27-28 s with 5: slurmctld's
# ping cycle, not the timeout, sets most of it.
SLURMD_TIMEOUT="${BUDGETLAB_SLURM_SLURMD_TIMEOUT:-$( ((NODES > 1)) && echo 10 || echo 300)}"
HOSTS_TAG="# budgetlab-slurm $DIR"
DB_PASS="budgetlab-local"   # local-only database bound to 127.0.0.1
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

export SLURM_CONF="$DIR/etc/slurm.conf"

log() { echo "cluster.sh: $*" >&2; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE -> 0 if the process in it runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "$what did not come up in ${secs}s (logs in $DIR/log)"
        sleep 0.3
    done
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    ((${#missing[@]} == 0)) && return 0
    if ((EUID != 0)); then
        die "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

node_port() {  # node_port INDEX(0-based): one node keeps SlurmdPort, N nodes get +10+i
    if ((NODES == 1)); then echo "$SLURMD_PORT"; else echo $((PORT_BASE + 11 + $1)); fi
}

node_lines() {  # the NodeName lines: CPUs, memory and GPUs shared out between the nodes
    local cpus=$((CPUS / NODES)) mem=$((MEM_MB / NODES)) gpus=$((GPUS / NODES)) i
    ((cpus >= 1)) || die "BUDGETLAB_SLURM_CPUS=$CPUS is fewer than one CPU per node ($NODES nodes)"
    for i in "${!NAMES[@]}"; do
        local gres=""; ((gpus > 0)) && gres=" Gres=gpu:$gpus"
        echo "NodeName=${NAMES[$i]} NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$(node_port "$i") CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN"
    done
}

write_config() {
    mkdir -p "$DIR"/{etc,log,run,dev,munge,mysql,state/ctld,state/d}
    chmod 700 "$DIR/munge"
    for i in $(seq 0 $((GPUS - 1))); do   # fake GPUs: char devices slurmd can stat
        [[ -c "$DIR/dev/gpu$i" ]] || mknod "$DIR/dev/gpu$i" c 195 "$i"
    done
    local new="$DIR/etc/slurm.conf.new" line
    sed -e "s|@DIR@|$DIR|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@NODE@|$NODE|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@SLURMD_TIMEOUT@|$SLURMD_TIMEOUT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" "$HERE/slurm.conf.in" |
    while IFS= read -r line; do
        if [[ "$line" == "@NODE_LINES@" ]]; then node_lines; else printf '%s\n' "$line"; fi
    done > "$new"
    CONFIG_CHANGED=0
    if ! cmp -s "$new" "$DIR/etc/slurm.conf"; then CONFIG_CHANGED=1; fi
    mv "$new" "$DIR/etc/slurm.conf"
    echo "AutoDetect=off" > "$DIR/etc/gres.conf"
    local per=$((GPUS / NODES)) i
    if ((per > 0)); then
        for i in "${!NAMES[@]}"; do
            echo "NodeName=${NAMES[$i]} Name=gpu File=$DIR/dev/gpu[$((i * per))-$((i * per + per - 1))]" >> "$DIR/etc/gres.conf"
        done
    fi
    sed -e "s|@DIR@|$DIR|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@DB_PASS@|$DB_PASS|g" "$HERE/slurmdbd.conf.in" > "$DIR/etc/slurmdbd.conf"
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
    alive "$DIR/run/munged.pid" && return 0
    [[ -s "$DIR/munge/munge.key" ]] || mungekey --create --keyfile="$DIR/munge/munge.key" --force
    chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed"
    wait_for 10 munged test -S "$DIR/munge/munge.socket"
}

start_mariadb() {
    if ! alive "$DIR/run/mariadb.pid"; then
        if [[ ! -d "$DIR/mysql/mysql" ]]; then
            mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root \
                --auth-root-authentication-method=socket --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
                || die "mariadb-install-db failed, see $DIR/log/mariadb-install.log"
        fi
        setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" \
            --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadb.pid" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M \
            --innodb-flush-log-at-trx-commit=2 --innodb-lock-wait-timeout=900 \
            </dev/null >/dev/null 2>&1 &
        wait_for 30 mariadb mariadb-admin --no-defaults -S "$DIR/run/mariadb.sock" -u root ping
    fi
    mariadb --no-defaults -S "$DIR/run/mariadb.sock" -u root -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
    alive "$DIR/run/slurmdbd.pid" && return 0
    slurmdbd 2>>"$DIR/log/slurmdbd.log" \
        || die "slurmdbd did not start, see $DIR/log/slurmdbd.log"
    wait_for 30 slurmdbd sacctmgr -n list cluster
}

setup_accounting() {  # idempotent: cluster, an account, root in it
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i -Q add account budgetlab Cluster="$CLUSTER" Description=budgetlab Organization=budgetlab >/dev/null 2>&1 || true
    sacctmgr -i -Q add user root Account=budgetlab Cluster="$CLUSTER" >/dev/null 2>&1 || true
}

slurmd_pidfiles() {  # every slurmd pid file of this directory (also nodes of an older config)
    local f
    for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmd.pid"; do [[ -e "$f" ]] && echo "$f"; done
    return 0
}

start_slurmd() {  # start_slurmd NAME
    mkdir -p "$DIR/state/d/$1"
    alive "$DIR/run/slurmd-$1.pid" && return 0
    slurmd -f "$SLURM_CONF" -N "$1" 2>>"$DIR/log/slurmd-$1.log" \
        || die "slurmd of node $1 did not start, see $DIR/log/slurmd-$1.log"
}

start_slurm() {
    if ((CONFIG_CHANGED)) && { alive "$DIR/run/slurmctld.pid" || [[ -n "$(slurmd_pidfiles)" ]]; }; then
        log "configuration changed: restarting slurmctld and slurmd"
        stop_slurmds; stop_pid slurmctld
    fi
    if ! alive "$DIR/run/slurmctld.pid"; then
        slurmctld -f "$SLURM_CONF" 2>>"$DIR/log/slurmctld.log" \
            || die "slurmctld did not start, see $DIR/log/slurmctld.log"
    fi
    local name
    for name in "${NAMES[@]}"; do start_slurmd "$name"; done
    for name in "${NAMES[@]}"; do wait_for 60 "node $name" node_ready "$name"; done
}

node_ready() {  # node_ready NAME
    local state
    state="$(sinfo -h -n "$1" -o %T 2>/dev/null | head -1)"
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] && return 0
    # A node left DOWN by an earlier unclean stop (or by kill-node) is brought back.
    [[ "$state" == down* || "$state" == drain* ]] && scontrol update NodeName="$1" State=RESUME >/dev/null 2>&1
    return 1
}

stop_slurmds() {
    local f
    for f in $(slurmd_pidfiles); do f="${f##*/}"; stop_pid "${f%.pid}"; done
}

own_steps() {  # own_steps [NODE]: pids of this cluster's slurmstepd (of NODE only, if given)
    # A slurmstepd keeps its slurmd's log open: $DIR/log/slurmd-NODE.log tells whose it is.
    local pid want="$DIR/log/slurmd-${1:-}"
    for pid in $(pgrep -f "^slurmstepd: \[" || true); do
        # (no `| grep -q`: under pipefail, find's SIGPIPE would make a match look like none)
        if [[ -n "$(find "/proc/$pid/fd" -maxdepth 1 -lname "$want*" 2>/dev/null)" ]]; then echo "$pid"; fi
    done
}

any_alive() {  # any_alive PID...
    local p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}

descendants() {  # descendants PID...: the pids and every process below them
    local -A kids=()
    local pid ppid
    while read -r pid ppid; do kids[$ppid]+=" $pid"; done < <(ps -e -o pid=,ppid=)
    local queue=("$@") out=()
    while ((${#queue[@]})); do
        pid=${queue[0]}; queue=("${queue[@]:1}"); out+=("$pid")
        for ppid in ${kids[$pid]:-}; do queue+=("$ppid"); done
    done
    echo "${out[@]}"
}

known_node() {  # from the running config, whatever BUDGETLAB_SLURM_NODES says now
    grep -q "^NodeName=$1 " "$SLURM_CONF" 2>/dev/null && return 0
    die "no node $1 in this cluster ($SLURM_CONF: $(grep -o '^NodeName=[^ ]*' "$SLURM_CONF" 2>/dev/null | cut -d= -f2 | tr '\n' ' '))"
}

cmd_kill_node() {  # a real node loss: its slurmd and every job process on it, SIGKILL
    local name=${1:-}
    [[ -n "$name" ]] || die "usage: cluster.sh kill-node NAME"
    known_node "$name"
    local pids=() steps
    alive "$DIR/run/slurmd-$name.pid" && pids+=("$(cat "$DIR/run/slurmd-$name.pid")")
    steps="$(own_steps "$name")"
    # shellcheck disable=SC2206
    [[ -n "$steps" ]] && pids+=($(descendants $steps))
    ((${#pids[@]})) || { log "node $name: nothing running"; return 0; }
    kill -9 "${pids[@]}" 2>/dev/null || true
    rm -f "$DIR/run/slurmd-$name.pid"
    log "killed node $name (slurmd and ${#pids[@]} process(es) in all); slurmctld marks it DOWN after SlurmdTimeout=${SLURMD_TIMEOUT}s"
}

cmd_revive_node() {
    local name=${1:-}
    [[ -n "$name" ]] || die "usage: cluster.sh revive-node NAME"
    known_node "$name"
    start_slurmd "$name"
    wait_for 60 "node $name" node_ready "$name"
    log "node $name is back: $(sinfo -h -n "$name" -o %T)"
}

hosts_add() {  # the node names resolve to this host (slurmd -N NAME, srun, MASTER_ADDR)
    ((NODES > 1)) || return 0
    grep -qxF "127.0.0.1 ${NAMES[*]} $HOSTS_TAG" /etc/hosts && return 0
    hosts_remove
    echo "127.0.0.1 ${NAMES[*]} $HOSTS_TAG" >> /etc/hosts
}

hosts_remove() {  # only this cluster's line; /etc/hosts may be a bind mount: rewrite in place
    grep -qF -- "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
    local kept; kept="$(grep -vF -- "$HOSTS_TAG" /etc/hosts)"
    printf '%s\n' "$kept" > /etc/hosts
}

stop_pid() {
    local name=$1 pidfile="$DIR/run/$1.pid"
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    local pid; pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 10s: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$pidfile"
}

cmd_up() {
    install_packages
    ((EUID == 0)) || die "the local cluster runs its daemons as root (mknod, slurmd); run as root"
    write_config
    hosts_add
    start_munge
    start_mariadb
    start_slurmdbd
    setup_accounting
    start_slurm
    log "up: $(sinfo -h -o '%P %a %D %T' | tr '\n' ';') SLURM_CONF=$SLURM_CONF"
}

cmd_down() {
    # The slurmstepd of this cluster's jobs still running (never another cluster's), and
    # the job processes under them.
    local steps; steps="$(own_steps)"
    stop_slurmds
    for name in slurmctld slurmdbd mariadb munged; do stop_pid "$name"; done
    if [[ -n "$steps" ]]; then
        local pids; pids="$(descendants $steps)"
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        for _ in $(seq 1 50); do any_alive $pids || break; sleep 0.2; done
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
    fi
    hosts_remove
    log "down"
}

cmd_status() {
    local rc=0
    for name in munged mariadb slurmdbd slurmctld; do
        if alive "$DIR/run/$name.pid"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
        else echo "$name: stopped"; rc=1; fi
    done
    for name in "${NAMES[@]}"; do
        if alive "$DIR/run/slurmd-$name.pid"; then echo "slurmd $name: running (pid $(cat "$DIR/run/slurmd-$name.pid"))"
        else echo "slurmd $name: stopped"; rc=1; fi
    done
    ((rc == 0)) && sinfo -o '%P %a %l %D %T %N %G'
    return $rc
}

cmd_env() {  # what a later `cluster.sh kill-node` or a test needs to find this cluster again
    echo "SLURM_CONF=$SLURM_CONF"
    echo "BUDGETLAB_SLURM_DIR=$DIR"
    echo "BUDGETLAB_SLURM_NODES=$NODES"
    echo "BUDGETLAB_SLURM_CLUSTER=$CLUSTER"
    echo "BUDGETLAB_SLURM_PORT_BASE=$PORT_BASE"
    echo "BUDGETLAB_SLURM_NODE_PREFIX=$PREFIX"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    kill-node) cmd_kill_node "${2:-}" ;;
    revive-node) cmd_revive_node "${2:-}" ;;
    *) echo "usage: $0 up|down|status|env|kill-node NAME|revive-node NAME" >&2; exit 2 ;;
esac
