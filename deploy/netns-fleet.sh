#!/usr/bin/env bash
# netns-fleet.sh — a Whittle fleet on one Linux machine, every process in its own network namespace.
#
# The coordinator and N workers each get a network namespace with one veth interface (eth0) and its own IPv4
# address in a /24 of 10.x; the other ends of the veth pairs are ports of a bridge (br0) that lives in a namespace
# of its own (PREFIX-sw), so nothing is added to the host's own network stack and several fleets can run side by
# side with different --prefix values. Every request (enrollment, heartbeats, task downloads, reports, admin
# commands) crosses a veth pair and the bridge: a real network path with real source addresses, not loopback.
#
#     PREFIX-coord  eth0 10.77.0.1  ──veth── coord ┐
#     PREFIX-w1     eth0 10.77.0.11 ──veth── w1    ├─ br0   (namespace PREFIX-sw, no address)
#     PREFIX-w2     eth0 10.77.0.12 ──veth── w2    ┘
#
# `up` makes the namespaces and the bridge, runs `coordinator init` with the coordinator's address as the server
# certificate's IP SAN and `listen`/`url` in coordinator.conf, starts `coordinator serve` in PREFIX-coord, creates
# one enrollment token, enrolls each worker from its own namespace (`worker enroll --ca-fingerprint`), starts
# `worker run` there with a shard of data, waits until every worker is online, and with --round runs a small
# federated round (int8, minmax calibration, no pruning) and fetches its model. It then stays in the foreground
# until Ctrl-C or SIGTERM (or exits at once with --once or --keep). Everything it made is removed on exit, on
# error and on Ctrl-C, unless --keep; `down` removes a kept fleet.
#
# Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `ip netns`), iproute2, and python3 with numpy when it has to
# make the data shards itself (no --shards).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=$(basename "$0")

usage() {
    cat <<EOF
Usage: $PROG [up] [options] [-- extra 'coordinator round start' options]
       $PROG down [--prefix P]
       $PROG status [--prefix P]

Runs a Whittle coordinator and N workers, each in its own network namespace, connected by veth pairs to a bridge.

Options (up):
  --workers N            number of workers (default 3, at most 200)
  --prefix P             namespace prefix: P-sw, P-coord, P-w1… (default whittle)
  --subnet A.B.C         the /24 to use, e.g. 10.77.0 (default); the coordinator is .1, worker k is .(10+k)
  --port PORT            the coordinator's HTTPS port (default 8443)
  --bin DIR              where the coordinator and worker binaries are (default: .build/release of this repository)
  --coordinator-bin PATH the coordinator binary (default: DIR/coordinator)
  --worker-bin PATH      the worker binary (default: DIR/worker)
  --workdir DIR          data directories and logs (default: a new temporary directory, removed at teardown
                         unless something failed)
  --shards DIR           worker data: DIR/board-K/x.npy, and optionally y.npy (labels), eval_x.npy, eval_y.npy
                         (default: non-IID shards of examples/data made with python3 + numpy)
  --heartbeat-seconds S  heartbeat_seconds written to coordinator.conf (default 2)
  --threads T            compute threads per worker (default 1)
  --round                run a federated round once the workers are online: --model, --quantize int8
                         --calibration minmax --min-workers N, no pruning (options after -- are added to
                         'coordinator round start' and override these), then fetch the model to WORKDIR
  --model PATH           the round's base model (default examples/models/defect_cnn.onnx)
  --round-timeout SEC    give up on the round after this many seconds (default 300)
  --once                 exit after setting up (and the round), tearing everything down
  --keep                 exit after setting up (and the round), leaving everything running; remove it with
                         '$PROG down --prefix P'
  -h, --help             this help

Without --once or --keep the fleet runs until Ctrl-C (or SIGTERM), then everything is removed.
WORKDIR/fleet.env records the prefix, addresses, data directory and binaries of a running fleet; admin commands
run inside the coordinator's namespace, e.g.
  ip netns exec P-coord COORDINATOR workers list --dir WORKDIR/coordinator
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

log() { echo "== $*"; }

# ---- options ------------------------------------------------------------------------------------------------------

COMMAND=up
case "${1:-}" in
    up | down | status) COMMAND=$1; shift ;;
esac

WORKERS=3
PREFIX=whittle
SUBNET=10.77.0
PORT=8443
BIN="$ROOT/.build/release"
COORDINATOR_BIN=
WORKER_BIN=
WORKDIR=
SHARDS=
HEARTBEAT_SECONDS=2
THREADS=1
ROUND=0
MODEL="$ROOT/examples/models/defect_cnn.onnx"
ROUND_TIMEOUT=300
ONCE=0
KEEP=0
ROUND_EXTRA=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --workers) need_value "$@"; WORKERS=$2; shift 2 ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --subnet) need_value "$@"; SUBNET=$2; shift 2 ;;
        --port) need_value "$@"; PORT=$2; shift 2 ;;
        --bin) need_value "$@"; BIN=$2; shift 2 ;;
        --coordinator-bin) need_value "$@"; COORDINATOR_BIN=$2; shift 2 ;;
        --worker-bin) need_value "$@"; WORKER_BIN=$2; shift 2 ;;
        --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
        --shards) need_value "$@"; SHARDS=$2; shift 2 ;;
        --heartbeat-seconds) need_value "$@"; HEARTBEAT_SECONDS=$2; shift 2 ;;
        --threads) need_value "$@"; THREADS=$2; shift 2 ;;
        --round) ROUND=1; shift ;;
        --model) need_value "$@"; MODEL=$2; shift 2 ;;
        --round-timeout) need_value "$@"; ROUND_TIMEOUT=$2; shift 2 ;;
        --once) ONCE=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; ROUND_EXTRA=("$@"); break ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done

# in_range FLAG VALUE MIN MAX: dies unless VALUE is an integer in [MIN, MAX].
in_range() {
    if ! [[ $2 =~ ^[0-9]{1,9}$ ]] || ((10#$2 < $3 || 10#$2 > $4)); then
        die "$1 must be an integer in $3..$4, not '$2'"
    fi
}
in_range --workers "$WORKERS" 1 200
in_range --port "$PORT" 1 65535
in_range --heartbeat-seconds "$HEARTBEAT_SECONDS" 1 3600
in_range --threads "$THREADS" 1 1024
in_range --round-timeout "$ROUND_TIMEOUT" 1 86400
[[ $PREFIX =~ ^[a-z][a-z0-9-]{0,19}$ ]] || die "--prefix must be a lowercase letter then up to 19 of [a-z0-9-], not '$PREFIX'"
[[ $SUBNET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || die "--subnet must be three octets like 10.77.0, not '$SUBNET'"
for octet in "${BASH_REMATCH[@]:1}"; do ((10#$octet <= 255)) || die "--subnet '$SUBNET' has an octet over 255"; done
((ONCE == 0 || KEEP == 0)) || die "--once and --keep exclude each other"
((${#ROUND_EXTRA[@]} == 0 || ROUND == 1)) || die "options after -- are for the round; give --round"

SWITCH_NS="$PREFIX-sw"
COORD_NS="$PREFIX-coord"
COORD_IP="$SUBNET.1"
COORD_URL="https://$COORD_IP:$PORT"
worker_ns() { echo "$PREFIX-w$1"; }
worker_ip() { echo "$SUBNET.$((10 + $1))"; }
worker_name() { echo "board-$1"; }

require_root() {
    [[ $EUID -eq 0 ]] || die "needs root: network namespaces, veth pairs and bridges need CAP_NET_ADMIN and CAP_SYS_ADMIN (run it with sudo)"
    command -v ip >/dev/null || die "needs iproute2's 'ip' command"
}

# Namespaces of this prefix, workers first, then the coordinator, then the switch (the order of teardown).
prefix_namespaces() {
    local all
    all=$(ip netns list 2>/dev/null | awk '{print $1}') || true
    grep -E "^$PREFIX-w[0-9]+$" <<<"$all" | sort -V || true
    grep -Fx "$COORD_NS" <<<"$all" || true
    grep -Fx "$SWITCH_NS" <<<"$all" || true
}

# ---- teardown -----------------------------------------------------------------------------------------------------

# pids_in NS…: the processes in these namespaces.
pids_in() {
    local ns
    for ns in "$@"; do ip netns pids "$ns" 2>/dev/null || true; done
}

# stop_in NS…: SIGTERM to every process in these namespaces, SIGKILL to those still there after 10 s.
stop_in() {
    local pid deadline
    for pid in $(pids_in "$@"); do kill -TERM "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    while [[ -n $(pids_in "$@") ]] && ((SECONDS < deadline)); do sleep 0.1; done
    for pid in $(pids_in "$@"); do
        echo "$PROG: process $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) did not stop within 10 s of SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + 5))
    while [[ -n $(pids_in "$@") ]] && ((SECONDS < deadline)); do sleep 0.1; done
}

# Stops the workers, then the coordinator (gracefully: SIGTERM), then deletes the prefix's namespaces; deleting the
# coordinator's and workers' namespaces destroys their veth pairs, deleting the switch's the bridge.
teardown_prefix() {
    local namespaces workers=() ns
    mapfile -t namespaces < <(prefix_namespaces)
    if ((${#namespaces[@]} == 0)); then
        echo "no network namespaces with prefix '$PREFIX'"
        return 0
    fi
    for ns in "${namespaces[@]}"; do
        [[ $ns == "$COORD_NS" || $ns == "$SWITCH_NS" ]] || workers+=("$ns")
    done
    ((${#workers[@]} == 0)) || stop_in "${workers[@]}"
    stop_in "${namespaces[@]}"
    for ns in "${namespaces[@]}"; do
        ip netns del "$ns" 2>/dev/null || echo "$PROG: could not delete network namespace $ns" >&2
    done
    echo "removed network namespaces: ${namespaces[*]}"
}

if [[ $COMMAND == down ]]; then
    require_root
    teardown_prefix
    remaining=$(prefix_namespaces)
    [[ -z $remaining ]] || die "namespaces left behind: $remaining"
    exit 0
fi

if [[ $COMMAND == status ]]; then
    require_root
    mapfile -t namespaces < <(prefix_namespaces)
    ((${#namespaces[@]} > 0)) || { echo "no namespaces with prefix '$PREFIX'"; exit 0; }
    for ns in "${namespaces[@]}"; do
        addresses=$(ip -n "$ns" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' || true)
        processes=""
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            processes+="$pid:$(cat "/proc/$pid/comm" 2>/dev/null || echo '?') "
        done
        printf '%-20s %-18s %s\n' "$ns" "${addresses:-–}" "${processes:-–}"
    done
    exit 0
fi

# ---- up -----------------------------------------------------------------------------------------------------------

require_root
COORDINATOR_BIN=${COORDINATOR_BIN:-$BIN/coordinator}
WORKER_BIN=${WORKER_BIN:-$BIN/worker}
# Wait a little for binaries a concurrent build is relinking.
for binary in "$COORDINATOR_BIN" "$WORKER_BIN"; do
    for _ in $(seq 60); do [[ -x $binary ]] && break; sleep 1; done
    [[ -x $binary ]] || die "$binary is not an executable (build it with 'swift build -c release', or give --bin)"
done
COORDINATOR_BIN=$(realpath -s "$COORDINATOR_BIN")
WORKER_BIN=$(realpath -s "$WORKER_BIN")
[[ $ROUND == 0 || -f $MODEL ]] || die "--model $MODEL does not exist"
MODEL=$(realpath -m "$MODEL")
[[ -z $(prefix_namespaces) ]] || die "network namespaces with prefix '$PREFIX' exist already (another fleet?); remove them with '$PROG down --prefix $PREFIX' or use another --prefix"

MADE_WORKDIR=0
if [[ -z $WORKDIR ]]; then
    WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/whittle-netns.XXXXXX")
    MADE_WORKDIR=1
else
    mkdir -p "$WORKDIR"
    WORKDIR=$(realpath "$WORKDIR")
    [[ ! -e $WORKDIR/coordinator ]] || die "$WORKDIR/coordinator exists already; give an empty --workdir"
fi
DATA_DIR="$WORKDIR/coordinator"
LOGS="$WORKDIR/logs"
mkdir -p "$LOGS" "$WORKDIR/workers"

PIDS=()
RUNNING=0
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if ((KEEP)) && ((status == 0)); then
        return 0
    fi
    # Ctrl-C or SIGTERM while the fleet runs in the foreground is the normal way to stop it.
    local failed=1
    if ((status == 0)) || { ((RUNNING)) && ((status == 130 || status == 143)); }; then
        failed=0
    fi
    if ((failed)) && ((status != 130 && status != 143)); then
        echo "$PROG: failed (exit status $status); logs in $LOGS" >&2
        local f
        for f in "$LOGS"/*.log; do
            [[ -s $f ]] || continue
            echo "---- $(basename "$f") (last lines)" >&2
            tail -n 15 "$f" >&2
        done
    fi
    if ((KEEP)); then
        echo "$PROG: --keep: leaving the fleet as it is; remove it with '$PROG down --prefix $PREFIX'" >&2
        return 0
    fi
    log "tearing down"
    teardown_prefix
    local pid
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if ((MADE_WORKDIR)) && ((failed == 0)); then
        rm -rf "$WORKDIR"
    else
        echo "data directories and logs kept in $WORKDIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command inside a namespace.
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# ---- the network --------------------------------------------------------------------------------------------------

log "network: bridge br0 in $SWITCH_NS, $COORD_NS at $COORD_IP, $WORKERS workers from $(worker_ip 1) on $SUBNET.0/24"
if ! ip netns add "$SWITCH_NS" 2>"$LOGS/netns.err"; then
    die "cannot create network namespaces here ('ip netns add $SWITCH_NS': $(cat "$LOGS/netns.err")); it needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN, outside a restricted container"
fi
ip -n "$SWITCH_NS" link set lo up
ip -n "$SWITCH_NS" link add br0 type bridge
ip -n "$SWITCH_NS" link set br0 up

# attach NAMESPACE PORT ADDRESS: a namespace whose eth0 is one end of a veth pair, the other end (PORT) on br0.
attach() {
    local ns=$1 port=$2 address=$3
    ip netns add "$ns"
    ip link add eth0 netns "$ns" type veth peer name "$port" netns "$SWITCH_NS"
    ip -n "$SWITCH_NS" link set "$port" master br0
    ip -n "$SWITCH_NS" link set "$port" up
    ip -n "$ns" addr add "$address/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
}
attach "$COORD_NS" coord "$COORD_IP"
for k in $(seq "$WORKERS"); do
    attach "$(worker_ns "$k")" "w$k" "$(worker_ip "$k")"
done

# ---- the coordinator ----------------------------------------------------------------------------------------------

log "coordinator init --dir $DATA_DIR --hostname $COORD_IP --listen $COORD_IP:$PORT"
"$COORDINATOR_BIN" init --dir "$DATA_DIR" --hostname "$COORD_IP" --listen "$COORD_IP:$PORT" >"$LOGS/init.log"
# listen is set by init; url (what admin commands connect to) and a short heartbeat for the demonstration.
sed -i -e "s|^url = .*|url = $COORD_URL|" -e "s|^heartbeat_seconds = .*|heartbeat_seconds = $HEARTBEAT_SECONDS|" \
    "$DATA_DIR/coordinator.conf"
grep -qx "url = $COORD_URL" "$DATA_DIR/coordinator.conf" || die "could not set url in $DATA_DIR/coordinator.conf"
if command -v openssl >/dev/null; then
    san=$(openssl x509 -in "$DATA_DIR/server.pem" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')
    [[ $san == "IPAddress:$COORD_IP" ]] || die "the server certificate's subjectAltName is '$san', expected IP Address:$COORD_IP"
    echo "server certificate subjectAltName: IP Address:$COORD_IP"
fi

in_ns "$COORD_NS" "$COORDINATOR_BIN" serve --dir "$DATA_DIR" >"$LOGS/coordinator.log" 2>&1 </dev/null &
COORD_PID=$!
PIDS+=("$COORD_PID")
for _ in $(seq 300); do
    [[ -f $DATA_DIR/listening ]] && break
    kill -0 "$COORD_PID" 2>/dev/null || die "coordinator serve exited: $(tail -n 5 "$LOGS/coordinator.log")"
    sleep 0.1
done
[[ -f $DATA_DIR/listening ]] || die "coordinator serve did not start listening within 30 s"
log "coordinator serve (pid $COORD_PID) in $COORD_NS: $(cat "$DATA_DIR/listening")"

# ---- enrollment ---------------------------------------------------------------------------------------------------

# The token is printed once (the coordinator keeps only its hash); the fingerprint is the SHA-256 of the CA
# certificate's DER, which an operator can also compute from ca.pem and hand to the boards out of band.
token_json=$(in_ns "$COORD_NS" "$COORDINATOR_BIN" token create --dir "$DATA_DIR" --uses "$WORKERS" --ttl 10m --json)
TOKEN=$(sed -n 's/.*"token" *: *"\([0-9A-Za-z_-]*\)".*/\1/p' <<<"$token_json")
FINGERPRINT=$(sed -n 's/.*"caFingerprint" *: *"\([0-9a-f]*\)".*/\1/p' <<<"$token_json")
[[ -n $TOKEN && ${#FINGERPRINT} -eq 64 ]] || die "unexpected answer from coordinator token create: $token_json"
if command -v openssl >/dev/null && command -v sha256sum >/dev/null; then
    computed=$(openssl x509 -in "$DATA_DIR/ca.pem" -outform DER | sha256sum | cut -d' ' -f1)
    [[ $computed == "$FINGERPRINT" ]] || die "the token's CA fingerprint $FINGERPRINT is not ca.pem's ($computed)"
fi
log "token for $WORKERS enrollments (10 min); CA fingerprint $FINGERPRINT"

if [[ -z $SHARDS ]]; then
    SHARDS="$WORKDIR/shards"
    command -v python3 >/dev/null || die "python3 (with numpy) is needed to make the data shards; or give --shards"
    log "data: non-IID shards of examples/data in $SHARDS"
    python3 - "$ROOT" "$SHARDS" "$WORKERS" <<'EOF_PY'
import pathlib, sys
root, out, workers = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, str(root / "Tests" / "interop"))
import numpy as np
from rounds_support import load_test_split, load_train_split, non_iid_shards
x, y = load_train_split()
tx, ty = load_test_split()
for k, (part, test) in enumerate(zip(non_iid_shards(y, workers), non_iid_shards(ty, workers, seed=1)), start=1):
    d = out / f"board-{k}"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "x.npy", x[part].astype(np.float32)); np.save(d / "y.npy", y[part].astype(np.int64))
    np.save(d / "eval_x.npy", tx[test].astype(np.float32)); np.save(d / "eval_y.npy", ty[test].astype(np.int64))
EOF_PY
fi
SHARDS=$(realpath "$SHARDS")

for k in $(seq "$WORKERS"); do
    name=$(worker_name "$k")
    ns=$(worker_ns "$k")
    wdir="$WORKDIR/workers/$name"
    shard="$SHARDS/$name"
    [[ -f $shard/x.npy ]] || die "no data for $name: $shard/x.npy is missing"
    in_ns "$ns" "$WORKER_BIN" enroll --coordinator "$COORD_URL" "--token=$TOKEN" --ca-fingerprint "$FINGERPRINT" \
        --dir "$wdir" --name "$name" >"$LOGS/$name-enroll.log" 2>&1 ||
        die "worker enroll of $name from $ns failed: $(cat "$LOGS/$name-enroll.log")"
    args=(run --dir "$wdir" --data "$shard/x.npy" --threads "$THREADS")
    [[ -f $shard/y.npy ]] && args+=(--labels "$shard/y.npy")
    [[ -f $shard/eval_x.npy ]] && args+=(--eval-data "$shard/eval_x.npy")
    [[ -f $shard/eval_x.npy && -f $shard/eval_y.npy ]] && args+=(--eval-labels "$shard/eval_y.npy")
    in_ns "$ns" "$WORKER_BIN" "${args[@]}" >"$LOGS/$name.log" 2>&1 </dev/null &
    PIDS+=($!)
    echo "$name: enrolled from $ns ($(worker_ip "$k")), worker run pid $!"
done

cat >"$WORKDIR/fleet.env" <<EOF
# Written by $PROG: the fleet with prefix $PREFIX.
PREFIX=$PREFIX
COORD_NS=$COORD_NS
COORD_URL=$COORD_URL
DATA_DIR=$DATA_DIR
COORDINATOR_BIN=$COORDINATOR_BIN
WORKER_BIN=$WORKER_BIN
WORKERS=$WORKERS
EOF

# ---- heartbeats ---------------------------------------------------------------------------------------------------

admin() { in_ns "$COORD_NS" "$COORDINATOR_BIN" "$@" --dir "$DATA_DIR"; }

deadline=$((SECONDS + 60))
while true; do
    listed=$(admin workers list --json 2>/dev/null || true)
    online=$(grep -o '"state":"online"' <<<"$listed" | wc -l || true)
    ((online == WORKERS)) && break
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || die "process $pid exited early"; done
    ((SECONDS < deadline)) || die "only $online of $WORKERS workers came online within 60 s"
    sleep 0.5
done
log "all $WORKERS workers online (coordinator workers list, run in $COORD_NS):"
admin workers list

# ---- the round ----------------------------------------------------------------------------------------------------

if ((ROUND)); then
    log "round: $(basename "$MODEL"), int8, minmax calibration, quorum $WORKERS"
    # Without --json, round start prints just the round's id.
    ROUND_ID=$(admin round start --model "$MODEL" --quantize int8 --calibration minmax --min-workers "$WORKERS" \
        --phase-deadline 2m "${ROUND_EXTRA[@]}")
    [[ $ROUND_ID =~ ^[A-Za-z0-9._-]+$ ]] || die "unexpected answer from coordinator round start: ${ROUND_ID:0:300}"
    echo "ROUND_ID=$ROUND_ID" >>"$WORKDIR/fleet.env"
    echo "round $ROUND_ID started"
    if ! timeout "$ROUND_TIMEOUT" ip netns exec "$COORD_NS" "$COORDINATOR_BIN" round status "$ROUND_ID" --dir "$DATA_DIR" --wait; then
        admin round cancel "$ROUND_ID" >/dev/null 2>&1 || true
        die "round $ROUND_ID did not succeed within $ROUND_TIMEOUT s"
    fi
    admin round fetch "$ROUND_ID" --out "$WORKDIR/round-$ROUND_ID.onnx" --report "$WORKDIR/round-$ROUND_ID.json"
fi

# ---- running ------------------------------------------------------------------------------------------------------

if ((KEEP)); then
    cat <<EOF

Fleet '$PREFIX' left running (--keep); its settings are in $WORKDIR/fleet.env. Admin commands run in $COORD_NS:
  ip netns exec $COORD_NS $COORDINATOR_BIN workers list --dir $DATA_DIR
Remove it with: $0 down --prefix $PREFIX
EOF
    exit 0
fi
((ONCE)) && exit 0
echo
echo "fleet '$PREFIX' running; Ctrl-C stops it and removes the namespaces"
RUNNING=1
while kill -0 "$COORD_PID" 2>/dev/null; do
    sleep 1 &
    wait $! || true
done
RUNNING=0
die "coordinator serve exited: $(tail -n 5 "$LOGS/coordinator.log")"
