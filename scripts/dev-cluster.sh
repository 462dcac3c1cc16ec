#!/usr/bin/env bash
# Starts a local 3-coordinator cluster on 127.0.0.1, applies examples/web.yaml,
# reads it back from a follower, enrolls one agent with a join token, and
# prints the nodes and the cluster status.
#   scripts/dev-cluster.sh          run the demo, leave the cluster running
#   scripts/dev-cluster.sh stop     stop it
# State and logs live in ${CLOUDLESS_DEV_DIR:-/tmp/cloudless-dev}.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DIR="${CLOUDLESS_DEV_DIR:-/tmp/cloudless-dev}"
BIN="${CLOUDLESS_BIN:-target/release}"
PORTS=(7400 7410 7420)

stop() {
  if compgen -G "$DIR/*.pid" >/dev/null; then
    for f in "$DIR"/*.pid; do kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; done
  fi
}

if [[ "${1:-}" == "stop" ]]; then stop; echo "stopped"; exit 0; fi

if [[ -z "${CLOUDLESS_BIN:-}" ]]; then
  cargo build --release --bin cloudless-coordinator --bin cloudlessctl --bin cloudless-agent
fi
stop
rm -rf "$DIR" && mkdir -p "$DIR"
# One master key for all coordinators: it seals the cluster CA and token key.
"$BIN/cloudless-coordinator" gen-master-key "$DIR/master.key" >/dev/null

start() { # name mode port [join]
  local name=$1 mode=$2 port=$3 join=${4:-}
  local args=("$mode" --data-dir "$DIR/$name" --listen "127.0.0.1:$port" --http "127.0.0.1:$((port + 1))"
    --set "master_key_file=$DIR/master.key")
  [[ -n "$join" ]] && args+=(--join "$join")
  "$BIN/cloudless-coordinator" "${args[@]}" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

wait_ready() { # port
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$(($1 + 1))/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "coordinator on port $1 did not become ready; see $DIR/*.log" >&2
  exit 1
}

echo "==> starting coordinator c1 (init) on 127.0.0.1:${PORTS[0]}"
start c1 init "${PORTS[0]}"
wait_ready "${PORTS[0]}"
for i in 1 2; do
  # A new coordinator gets the cluster's sealed identity bundle (opened with the
  # shared master key) and issues its own mTLS certificate from it.
  mkdir -p "$DIR/c$((i + 1))/tls"
  cp "$DIR/c1/tls/identity.json" "$DIR/c$((i + 1))/tls/identity.json"
  echo "==> starting coordinator c$((i + 1)) joining 127.0.0.1:${PORTS[0]}"
  start "c$((i + 1))" run "${PORTS[$i]}" "127.0.0.1:${PORTS[0]}"
done
wait_ready "${PORTS[1]}"; wait_ready "${PORTS[2]}"

# init wrote admin credentials and a cloudlessctl config; every call is mTLS.
CTL=("$BIN/cloudlessctl" --config "$DIR/c1/admin/cloudlessctl.toml" --server "127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[0]}")
for _ in $(seq 1 50); do
  [[ "$("${CTL[@]}" cluster status -o json | grep -c '"state": "\(Leader\|Follower\)"')" == 3 ]] && break
  sleep 0.1
done
echo "==> cloudlessctl apply -f examples/web.yaml (sent to c2; followers forward writes to the leader)"
"${CTL[@]}" apply -f examples/web.yaml
echo "==> cloudlessctl get workloads (linearizable read)"
"${CTL[@]}" get workloads
echo "==> cloudlessctl token create --ttl 1h --max-uses 1 --label zone=eu-a (for enrolling a device)"
for _ in $(seq 1 50); do
  "${CTL[@]}" token create --ttl 1h --max-uses 1 --label zone=eu-a >"$DIR/join-token" 2>"$DIR/token.err" && break
  sleep 0.1
done
echo "token written to $DIR/join-token"
"${CTL[@]}" token list
echo "==> starting agent a1: enrolls with the token (key made locally, CSR sent), then heartbeats"
COORDS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
"$BIN/cloudless-agent" --data-dir "$DIR/a1" --coordinator "$COORDS" --name a1 \
  --join-token-file "$DIR/join-token" --ca-cert "$DIR/c1/admin/ca.crt" >"$DIR/a1.log" 2>&1 &
echo $! >"$DIR/a1.pid"
for _ in $(seq 1 50); do
  "${CTL[@]}" node list 2>/dev/null | grep -q " Ready " && break
  sleep 0.1
done
rm -f "$DIR/join-token"  # single use, and spent
echo "==> cloudlessctl node list"
"${CTL[@]}" node list
echo "==> cloudlessctl cluster status"
"${CTL[@]}" cluster status
echo
echo "Cluster is running (logs in $DIR). Metrics: curl http://127.0.0.1:$((PORTS[0] + 1))/metrics"
echo "cloudlessctl config (mTLS admin credentials): $DIR/c1/admin/cloudlessctl.toml"
echo "Stop it with: scripts/dev-cluster.sh stop"
