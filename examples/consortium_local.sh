#!/usr/bin/env bash
# A whole medfed consortium on this machine (127.0.0.1), with the exact commands of
# README "Run a real consortium": consortium CA, SuperLink (TLS + SuperNode
# authentication, loopback only) behind an nginx proxy that exposes only the Fleet
# API, three hospitals' SuperNodes, a 2-round run on tiny data, a rogue SuperNode
# and a SuperNode that does not trust the CA refused, and one hospital killed -9 in
# the middle of the run (quorum of two: the run still completes).
#
#   examples/consortium_local.sh [WORKDIR]        # needs nginx (apt-get install nginx)
#
# Every process it starts is stopped (by PID, process group) when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
APP_DIR=$(pwd)
W=$(realpath -m "${1:-$(mktemp -d /tmp/medfed-consortium.XXXXXX)}")
mkdir -p "$W/logs"
BIN=$(dirname "$(command -v medfed || echo "$APP_DIR/../venv/bin/medfed")")
export PATH="$BIN:$PATH" FLWR_HOME="$W/flwr-home" FLWR_TELEMETRY_ENABLED=0
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SL=$(port); PX=$(port)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 5
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    echo "stopped; logs and run directory in $W"
}
trap cleanup EXIT INT TERM
start() {  # start NAME CMD...: own process group, log in $W/logs/NAME.log
    local name=$1; shift
    setsid "$@" >"$W/logs/$name.log" 2>&1 &
    PIDS+=("$!"); eval "PID_${name//-/_}=$!"
}
wait_port() { for _ in $(seq 300); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.5; done; return 1; }
step() { printf '\n== %s\n' "$*"; }

step "1. coordinator: consortium CA and SuperLink certificate; each hospital: its key pair"
medfed certs init --out "$W/certs/ca"
medfed certs server --host 127.0.0.1 --host localhost --ca "$W/certs/ca" --out "$W/certs/server"
for s in hospital-a hospital-b hospital-c rogue; do medfed certs site "$s" --out "$W/certs/sites/$s"; done

step "2. coordinator: SuperLink on 127.0.0.1:$SL, nginx Fleet proxy on 127.0.0.1:$PX"
start superlink medfed deploy superlink --certs "$W/certs/server" --port "$SL" --database "$W/superlink.db"
NGINX_CMD=$(medfed deploy proxy-config --certs "$W/certs/server" --server-name localhost \
    --listen "127.0.0.1:$PX" --superlink-port "$SL" --standalone "$W/nginx")
# shellcheck disable=SC2086
start nginx $NGINX_CMD
wait_port "$SL" && wait_port "$PX"
medfed deploy connection consortium --address "127.0.0.1:$SL" --ca "$W/certs/server/ca.pem"

step "3. coordinator: register the hospitals' public keys"
for s in hospital-a hospital-b hospital-c; do
    flwr supernode register "$W/certs/sites/$s/site.pub" consortium --name "$s"
done

step "4. the proxy refuses the Control API (403) and forwards the Fleet API (401: unsigned)"
for path in /v1/control/list-runs /v1/fleet/pull-messages; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$W/certs/server/ca.pem" -X POST \
        -H 'content-type: application/protobuf' "https://127.0.0.1:$PX$path")
    echo "POST $path through the proxy -> HTTP $code"
done

step "5. hospitals: SuperNodes through the proxy, TLS + key authentication"
i=0
for s in hospital-a hospital-b hospital-c; do
    start "$s" env FLWR_HOME="$W/hospitals/$s/flwr-home" medfed deploy supernode --superlink "127.0.0.1:$PX" \
        --site-name "$s" --ca "$W/certs/server/ca.pem" --key "$W/certs/sites/$s/site.key" \
        --data-dir "$W/hospitals/$s/data" --state-dir "$W/hospitals/$s/state" --runtime-port "$(port)" --partition-id "$i" --num-partitions 3
    i=$((i + 1))
done
for s in hospital-a hospital-b hospital-c; do
    until grep -q "SuperNode ID:" "$W/logs/$s.log"; do sleep 1; done; echo "$s online"
done

step "6. refused: a SuperNode whose key is not registered, and one that does not trust the CA"
medfed certs init --out "$W/other-ca" >/dev/null
if FLWR_HOME="$W/hospitals/rogue" medfed deploy supernode --superlink "127.0.0.1:$PX" --site-name rogue \
    --ca "$W/certs/server/ca.pem" --key "$W/certs/sites/rogue/site.key" --runtime-port "$(port)" \
    --data-dir "$W/hospitals/rogue/data" --state-dir "$W/hospitals/rogue/state" \
    >"$W/logs/rogue.log" 2>&1; then echo "rogue connected?!"; exit 1; fi
grep -m1 "Failed to activate SuperNode" "$W/logs/rogue.log"
if medfed deploy supernode --superlink "127.0.0.1:$PX" --site-name hospital-a --ca "$W/other-ca/ca.pem" \
    --key "$W/certs/sites/hospital-a/site.key" --data-dir "$W/hospitals/hospital-a/data" \
    --state-dir "$W/hospitals/hospital-a/state" >"$W/logs/untrusting.log" 2>&1; then echo "connected?!"; exit 1; fi
grep -m1 -A1 "is not trusted" "$W/logs/untrusting.log"

step "7. coordinator: start a 2-round run, follow it, kill -9 hospital-c mid-run"
RUN=$(flwr run . consortium --format json --run-config "data.num_samples=120 model.width=4 server.rounds=2 \
    strategy.min_sites=2 strategy.fraction_evaluate=0.0 server.round_timeout=600.0 \
    server.out_dir=\"$W/runs\" server.run_name=\"consortium\"" | python3 -c 'import json,sys; print(json.load(sys.stdin)["run-id"])')
echo "run $RUN started (follow: flwr log $RUN consortium --stream; stop: flwr stop $RUN consortium)"
start follow flwr log "$RUN" consortium --stream
until [ "$(grep -c 'Receiving: train message' "$W/logs/hospital-c.log")" -ge 2 ]; do sleep 1; done
kill -KILL -- "-$PID_hospital_c"; echo "hospital-c killed during round 2"
until [ -f "$W/runs/consortium/summary.json" ]; do sleep 2; done

step "8. result"
python3 - "$W/runs/consortium" <<'EOF'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
for line in (run / "rounds.jsonl").read_text().splitlines()[1:]:
    r = json.loads(line)
    print(f"round {r['round']}: sites {sorted(r['sites'])}, aggregated {r['aggregated']}, global AUC {r['global'].get('auc')}")
s = json.loads((run / "summary.json").read_text())
print(f"{s['rounds_aggregated']} of {s['rounds_planned']} rounds aggregated; run directory {run}")
EOF
