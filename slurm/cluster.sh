#!/usr/bin/env bash
# A real one-node SLURM for development and tests, with accounting (sacct), a preempting
# partition and fake GPUs. Config and state live in $BUDGETLAB_SLURM_DIR, never /etc/slurm.
#
#   bash slurm/cluster.sh up       install what is missing (root), start every daemon
#   bash slurm/cluster.sh down     stop every daemon this script started
#   bash slurm/cluster.sh status   daemons and sinfo
#   bash slurm/cluster.sh env      NAME=value lines: eval "$(bash slurm/cluster.sh env)"
#
# Partitions: `batch` (default, PriorityTier 1, preemptable: REQUEUE) and `urgent`
# (PriorityTier 10, preempts batch). The node declares more CPUs than the machine has so
# several jobs run at once; slurmd trusts the config (SlurmdParameters=config_overrides).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${BUDGETLAB_SLURM_DIR:-/var/lib/budgetlab-slurm}"
CLUSTER="${BUDGETLAB_SLURM_CLUSTER:-budgetlab}"
CPUS="${BUDGETLAB_SLURM_CPUS:-16}"
GPUS="${BUDGETLAB_SLURM_GPUS:-4}"
MEM_MB="${BUDGETLAB_SLURM_MEM_MB:-32000}"
PORT_BASE="${BUDGETLAB_SLURM_PORT_BASE:-16810}"   # ctld +7, slurmd +8, dbd +9, mariadb +6
NODE="$(hostname -s)"
DB_PORT=$((PORT_BASE + 6)); CTLD_PORT=$((PORT_BASE + 7)); SLURMD_PORT=$((PORT_BASE + 8))
DBD_PORT=$((PORT_BASE + 9))
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

write_config() {
    mkdir -p "$DIR"/{etc,log,run,dev,munge,mysql,state/ctld,state/d}
    chmod 700 "$DIR/munge"
    for i in $(seq 0 $((GPUS - 1))); do   # fake GPUs: char devices slurmd can stat
        [[ -c "$DIR/dev/gpu$i" ]] || mknod "$DIR/dev/gpu$i" c 195 "$i"
    done
    local new="$DIR/etc/slurm.conf.new"
    sed -e "s|@DIR@|$DIR|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@NODE@|$NODE|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@GPUS@|$GPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" "$HERE/slurm.conf.in" > "$new"
    CONFIG_CHANGED=0
    if ! cmp -s "$new" "$DIR/etc/slurm.conf"; then CONFIG_CHANGED=1; fi
    mv "$new" "$DIR/etc/slurm.conf"
    echo "AutoDetect=off" > "$DIR/etc/gres.conf"
    echo "NodeName=$NODE Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >> "$DIR/etc/gres.conf"
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

start_slurm() {
    if ((CONFIG_CHANGED)) && { alive "$DIR/run/slurmctld.pid" || alive "$DIR/run/slurmd.pid"; }; then
        log "configuration changed: restarting slurmctld and slurmd"
        stop_pid slurmd; stop_pid slurmctld
    fi
    if ! alive "$DIR/run/slurmctld.pid"; then
        slurmctld -f "$SLURM_CONF" 2>>"$DIR/log/slurmctld.log" \
            || die "slurmctld did not start, see $DIR/log/slurmctld.log"
    fi
    if ! alive "$DIR/run/slurmd.pid"; then
        slurmd -f "$SLURM_CONF" 2>>"$DIR/log/slurmd.log" \
            || die "slurmd did not start, see $DIR/log/slurmd.log"
    fi
    wait_for 30 "node $NODE" node_ready
}

node_ready() {
    local state
    state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)"
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] && return 0
    # A node left DOWN by an earlier unclean stop is brought back.
    [[ "$state" == down* || "$state" == drain* ]] && scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1
    return 1
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
    start_munge
    start_mariadb
    start_slurmdbd
    setup_accounting
    start_slurm
    log "up: $(sinfo -h -o '%P %a %D %T' | tr '\n' ';') SLURM_CONF=$SLURM_CONF"
}

cmd_down() {
    for name in slurmd slurmctld slurmdbd mariadb munged; do stop_pid "$name"; done
    # slurmstepd of jobs still running belong to the cluster too.
    local steps; steps="$(pgrep -f "^slurmstepd: \[" || true)"
    if [[ -n "$steps" ]]; then kill $steps 2>/dev/null || true; fi
    log "down"
}

cmd_status() {
    local rc=0
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if alive "$DIR/run/$name.pid"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
        else echo "$name: stopped"; rc=1; fi
    done
    ((rc == 0)) && sinfo -o '%P %a %l %D %T %N %G'
    return $rc
}

cmd_env() {
    echo "SLURM_CONF=$SLURM_CONF"
    echo "BUDGETLAB_SLURM_DIR=$DIR"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
