#!/usr/bin/env bash
# A real Slurm on this one machine, for tests and demos: slurmctld, slurmdbd (accounting in MariaDB, so
# job states are real) and two slurmd "nodes" (kope-node1, kope-node2) on 127.0.0.1.
#
#   cluster/slurm/local-slurm.sh start    install what is missing, write configs, start what is not running
#   cluster/slurm/local-slurm.sh stop     stop the daemons this script started, by PID
#   cluster/slurm/local-slurm.sh status   one line per daemon
#   cluster/slurm/local-slurm.sh env      print the SLURM_CONF export that clients need
#
# Idempotent: `start` leaves running daemons alone. Everything lives in $KOPE_SLURM_DIR (default
# /tmp/kope-slurm); ports are private ones, so a system Slurm or MariaDB keeps working beside it.
# Needs root (or password-less sudo) for apt-get, /etc/hosts and the daemons.
set -euo pipefail

BASE="${KOPE_SLURM_DIR:-/tmp/kope-slurm}"
CLUSTER=kope-local
NODES=(kope-node1 kope-node2)
CPUS_PER_NODE="${KOPE_SLURM_CPUS_PER_NODE:-2}"
CTLD_PORT="${KOPE_SLURM_PORT_BASE:-16817}"
DBD_PORT=$((CTLD_PORT + 1))
DB_PORT=$((CTLD_PORT + 2))
FIRST_SLURMD_PORT=$((CTLD_PORT + 3))
DB_PASS=kope-local-slurm
CONF="$BASE/etc/slurm.conf"
RUN="$BASE/run"
LOG="$BASE/log"
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

say() { echo "local-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

alive() {  # alive NAME: the daemon recorded in $RUN/NAME.pid is running
    local pidfile="$RUN/$1.pid"
    [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    die "$what did not come up within ${seconds}s (logs in $LOG)"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
        || die "apt-get update failed (root or password-less sudo needed)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}" >/dev/null \
        || die "apt-get install ${PACKAGES[*]} failed"
}

add_hosts() {  # submitit takes the first node's name as MASTER_ADDR, so the names must resolve
    local node
    for node in "${NODES[@]}"; do
        getent hosts "$node" >/dev/null && continue
        echo "127.0.0.1 $node" | as_root tee -a /etc/hosts >/dev/null || die "cannot add $node to /etc/hosts"
    done
}

write_configs() {
    mkdir -p "$BASE/etc" "$RUN" "$LOG" "$BASE/state" "$BASE/spool"
    local host port i
    host="$(hostname -s)"
    {
        cat <<EOF
# Written by local-slurm.sh: two nodes on one host.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
EOF
        for i in "${!NODES[@]}"; do
            port=$((FIRST_SLURMD_PORT + i))
            echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=${NODES[$i]} Port=$port" \
                 "CPUs=$CPUS_PER_NODE RealMemory=8000 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    cat > "$BASE/etc/slurmdbd.conf.tmp" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$BASE/etc/slurmdbd.conf.tmp"
    mv "$BASE/etc/slurmdbd.conf.tmp" "$BASE/etc/slurmdbd.conf"
}

start_bg() {  # start_bg NAME COMMAND...: run a foreground daemon in the background, record its PID
    local name=$1
    shift
    nohup "$@" >>"$LOG/$name.out" 2>&1 &
    echo $! > "$RUN/$name.pid"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then return 0; fi  # a system munged is fine too
    [ -s /etc/munge/munge.key ] || as_root mungekey --create >/dev/null
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    start_bg munged runuser -u munge -- munged --foreground
    wait_for 10 munged munge_works
}

db() { mariadb --socket="$RUN/mysqld.sock" -u root "$@"; }

start_mariadb() {
    if ! alive mariadbd; then
        if [ ! -d "$BASE/mysql/mysql" ]; then
            mariadb-install-db --datadir="$BASE/mysql" --user=root --auth-root-authentication-method=socket \
                --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG)"
        fi
        start_bg mariadbd mariadbd --no-defaults --datadir="$BASE/mysql" --socket="$RUN/mysqld.sock" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --user=root --pid-file="$RUN/mariadbd.daemon.pid" \
            --log-error="$LOG/mariadbd.log" --innodb-buffer-pool-size=64M
        wait_for 60 mariadbd db -e "SELECT 1"
    fi
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

nodes_ready() {  # every node answers (idle, mixed or allocated)
    local states
    states="$(sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
    [ "$(echo "$states" | grep -cE ' (idle|mixed|allocated)$')" -eq "${#NODES[@]}" ]
}

start() {
    install_packages
    add_hosts
    write_configs
    export SLURM_CONF="$CONF"
    start_munge
    start_mariadb
    if ! alive slurmdbd; then
        start_bg slurmdbd slurmdbd -D
        wait_for 30 slurmdbd sacctmgr -n show cluster
    fi
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! alive slurmctld; then
        start_bg slurmctld slurmctld -D -i -f "$CONF"
        wait_for 30 slurmctld scontrol ping
    fi
    local node
    for node in "${NODES[@]}"; do
        alive "slurmd-$node" || start_bg "slurmd-$node" slurmd -D -N "$node" -f "$CONF"
    done
    wait_for 30 "slurmd nodes" nodes_ready
    say "up: ${NODES[*]} (export SLURM_CONF=$CONF)"
}

stop() {
    local name pid
    for name in "slurmd-${NODES[1]}" "slurmd-${NODES[0]}" slurmctld slurmdbd mariadbd munged; do
        alive "$name" || { rm -f "$RUN/$name.pid"; continue; }
        pid="$(cat "$RUN/$name.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        rm -f "$RUN/$name.pid"
        say "stopped $name (pid $pid)"
    done
}

status() {
    local name
    for name in munged mariadbd slurmdbd slurmctld "slurmd-${NODES[0]}" "slurmd-${NODES[1]}"; do
        if alive "$name"; then echo "$name running (pid $(cat "$RUN/$name.pid"))"; else echo "$name stopped"; fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
