#!/usr/bin/env bash
# The local demo: a containerd of its own, a local registry holding a busybox
# image built from Debian's busybox-static, 3 coordinators (mTLS, Raft) and 2
# agents (zones a and b) enrolled with join tokens; applies examples/hello.yaml
# (3 replicas spread over both zones), shows them running with their output,
# and leaves everything running.
#   scripts/dev-cluster.sh          run the demo, leave the cluster running
#   scripts/dev-cluster.sh stop     stop it
# State and logs live in ${CLOUDLESS_DEV_DIR:-/tmp/cloudless-dev}. Needs root
# (containers), containerd, runc, busybox-static and docker-registry
# (scripts/install-deps.sh installs them).
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DIR="${CLOUDLESS_DEV_DIR:-/tmp/cloudless-dev}"
BIN="${CLOUDLESS_BIN:-target/release}"
PORTS=(7400 7410 7420)
REGISTRY=127.0.0.1:7500

# Removes the iptables chains named <prefix>-* and the rules jumping to them,
# and the address locks (the nftables bridge table named after the prefix).
remove_chains() {
  nft delete table bridge "${1//-/_}" 2>/dev/null || true
  for table in filter nat; do
    { iptables -t "$table" -S 2>/dev/null || true; } | { grep -- "-j $1-" || true; } | { grep -v "^-A $1-" || true; } |
      sed 's/^-A /-D /' | while read -r rule; do eval iptables -t "$table" "$rule" 2>/dev/null || true; done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk -v p="-N $1-" 'index($0, p) == 1 {print $2}' || true); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk -v p="-N $1-" 'index($0, p) == 1 {print $2}' || true); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}

stop() {
  if [[ -f "$DIR/c1/admin/cloudlessctl.toml" ]] && compgen -G "$DIR/a-*.pid" >/dev/null; then
    # Deleted workloads give back their replicas' networks (veths, address
    # leases, port mappings, rules) through the agents.
    CTL=("$BIN/cloudlessctl" --config "$DIR/c1/admin/cloudlessctl.toml" --server "127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}")
    for w in $("${CTL[@]}" get workloads -o json 2>/dev/null | grep -o '"name": "[^"]*"' | cut -d'"' -f4); do
      "${CTL[@]}" delete workload "$w" >/dev/null 2>&1 || true
    done
    # The replicas leave the state at once; their agents stop them and give
    # their networks back within the stop grace period.
    for _ in $(seq 1 120); do
      compgen -G "$DIR/agent-*/network/cni/*.json" >/dev/null || break
      sleep 0.25
    done
  fi
  if compgen -G "$DIR/*.pid" >/dev/null; then
    # Agents first. A stopped agent leaves its containers running (edge
    # autonomy), so the demo removes them itself before containerd goes.
    for f in "$DIR"/a-*.pid; do
      [[ -f "$f" ]] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
      rm -f "$f"
    done
    for root in /run/containerd/runc/cloudless-demo-*; do
      [[ -d "$root" ]] || continue
      for c in "$root"/*; do
        [[ -d "$c" ]] && runc --root "$root" delete --force "$(basename "$c")" 2>/dev/null || true
      done
    done
    sleep 1
    for f in "$DIR"/*.pid; do
      [[ -f "$f" ]] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
      rm -f "$f"
    done
  fi
  pkill -f "containerd-shim-runc-v2 -namespace cloudless-demo" 2>/dev/null || true
  # The agents' bridges and node chains.
  for zone in a b; do
    ip link del "cld-$zone" 2>/dev/null || true
    remove_chains "CLOUDLESS-${zone^^}"
  done
  # Mounts containerd left (container root file systems).
  { grep -F " $DIR/" /proc/mounts 2>/dev/null || true; } | awk '{print $2}' | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

if [[ "${1:-}" == "stop" ]]; then stop; echo "stopped"; exit 0; fi

for tool in containerd runc docker-registry; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
[[ -x /bin/busybox ]] || { echo "/bin/busybox is missing: run scripts/install-deps.sh" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "the demo runs containers: run it as root" >&2; exit 1; }

if [[ -z "${CLOUDLESS_BIN:-}" ]]; then
  cargo build --release --bin cloudless-coordinator --bin cloudlessctl --bin cloudless-agent --bin cloudless-image
fi
stop
rm -rf "$DIR" && mkdir -p "$DIR"

echo "==> starting a containerd of the demo's own ($DIR/containerd)"
mkdir -p "$DIR/containerd"
cat >"$DIR/containerd/config.toml" <<TOML
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$DIR/containerd/containerd.sock"
[ttrpc]
  address = "$DIR/containerd/containerd-ttrpc.sock"
TOML
containerd --config "$DIR/containerd/config.toml" >"$DIR/containerd.log" 2>&1 &
echo $! >"$DIR/containerd.pid"
for _ in $(seq 1 100); do [[ -S "$DIR/containerd/containerd.sock" ]] && break; sleep 0.1; done

echo "==> starting a local registry on $REGISTRY and pushing busybox to it"
cat >"$DIR/registry.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $DIR/registry
http:
  addr: $REGISTRY
YAML
docker-registry serve "$DIR/registry.yml" >"$DIR/registry.log" 2>&1 &
echo $! >"$DIR/registry.pid"
for _ in $(seq 1 100); do curl -sf "http://$REGISTRY/v2/" >/dev/null && break; sleep 0.1; done
"$BIN/cloudless-image" busybox "$DIR/busybox.tar" >/dev/null
"$BIN/cloudless-image" push "$DIR/busybox.tar" "$REGISTRY/cloudless/busybox:1" --insecure

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
CTL=("$BIN/cloudlessctl" --config "$DIR/c1/admin/cloudlessctl.toml" --server "127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[2]}")
for _ in $(seq 1 50); do
  [[ "$("${CTL[@]}" cluster status -o json | grep -c '"state": "\(Leader\|Follower\)"')" == 3 ]] && break
  sleep 0.1
done
COORDS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
for zone in a b; do
  agent="agent-$zone"
  echo "==> join token for zone $zone; starting $agent (enrolls: key made locally, CSR sent, then heartbeats)"
  for _ in $(seq 1 50); do
    "${CTL[@]}" token create --ttl 10m --max-uses 1 --label "zone=$zone" >"$DIR/join-token-$zone" 2>"$DIR/token.err" && break
    sleep 0.1
  done
  "$BIN/cloudless-agent" --data-dir "$DIR/$agent" --coordinator "$COORDS" --name "$agent" \
    --join-token-file "$DIR/join-token-$zone" --ca-cert "$DIR/c1/admin/ca.crt" \
    --containerd-socket "$DIR/containerd/containerd.sock" --containerd-namespace "cloudless-demo-$zone" \
    --insecure-registry "$REGISTRY" --overlay-listen "127.0.0.1:0" --metrics-addr "127.0.0.1:$([[ $zone == a ]] && echo 9464 || echo 9465)" \
    --bridge "cld-$zone" --firewall-chain-prefix "CLOUDLESS-${zone^^}" --netns-dir "$DIR/$agent/netns" \
    >"$DIR/a-$zone.log" 2>&1 &
  echo $! >"$DIR/a-$zone.pid"
done
for _ in $(seq 1 100); do
  [[ "$("${CTL[@]}" node list 2>/dev/null | grep -c " Ready ")" == 2 ]] && break
  sleep 0.1
done
rm -f "$DIR"/join-token-*  # single use, and spent
echo "==> cloudlessctl get nodes"
"${CTL[@]}" get nodes
echo "==> cloudlessctl apply -f examples/hello.yaml --wait"
"${CTL[@]}" apply -f examples/hello.yaml --wait --timeout 120
echo "==> cloudlessctl get workloads"
"${CTL[@]}" get workloads
echo "==> cloudlessctl get replicas"
"${CTL[@]}" get replicas
sleep 1
echo "==> cloudlessctl logs hello --tail 1 (through the coordinators and the agents' tunnels)"
"${CTL[@]}" logs hello --tail 1
echo "==> cloudlessctl apply -f examples/api.yaml, then examples/web.yaml (web reaches api at 127.0.0.1:9000: upstreams over the QUIC overlay)"
"${CTL[@]}" apply -f examples/api.yaml --wait --timeout 120
"${CTL[@]}" apply -f examples/web.yaml --wait --timeout 120
sleep 6
echo "==> cloudlessctl logs web --tail 2 (answers from api replicas on the other agent)"
"${CTL[@]}" logs web --tail 2
echo "==> cloudlessctl apply -f examples/caller.yaml (finds api by its name through the node's resolver, connects to its service address)"
"${CTL[@]}" apply -f examples/caller.yaml --wait --timeout 120
sleep 6
echo "==> cloudlessctl get services; logs caller --tail 2"
"${CTL[@]}" get services
"${CTL[@]}" logs caller --tail 2
echo "==> cloudlessctl get replicas -o wide (each replica's address on its node's subnet)"
"${CTL[@]}" get replicas -o wide
echo
echo "Cluster is running (logs in $DIR). Metrics: curl http://127.0.0.1:$((PORTS[0] + 1))/metrics"
echo "cloudlessctl: ${CTL[*]}"
echo "Try: ... logs hello -f; ... describe workload hello; ... scale workload hello --replicas 5"
echo "Try: kill the agent of one zone (kill \$(cat $DIR/a-a.pid)) and watch its replicas move: ... get replicas"
echo "Stop everything with: make demo-stop"
