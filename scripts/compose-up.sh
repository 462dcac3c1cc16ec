#!/usr/bin/env bash
# `make compose-up`: builds the images (scripts/images.sh; skip with
# CLOUDLESS_SKIP_IMAGES=1), starts the compose dev cluster
# (deployments/compose/) and waits until its 3 agents are Ready.
# Where prom/prometheus cannot be pulled it runs with compose.local.yaml
# (Prometheus from Debian's package, no Grafana); CLOUDLESS_COMPOSE_LOCAL=0|1
# forces the choice. Prints the time from `up` to 3 Ready agents.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/compose-lib.sh
source scripts/compose-lib.sh

if [[ "${CLOUDLESS_SKIP_IMAGES:-0}" != 1 ]]; then
  scripts/images.sh
fi
choose_files
AGENTS="${CLOUDLESS_COMPOSE_AGENTS:-3}"
start=$(date +%s.%N)
"${COMPOSE_CMD[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" up -d
echo "==> waiting for $AGENTS Ready agents"
ready=0
for _ in $(seq 1 240); do
  ready=$(ctl get nodes -o json 2>/dev/null | grep -c '"phase": "Ready"' || true)
  [[ "$ready" -ge "$AGENTS" ]] && break
  sleep 0.5
done
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
ctl get nodes || true
if [[ "$ready" -lt "$AGENTS" ]]; then
  echo "only $ready of $AGENTS agents are Ready after ${took} s; see: ${COMPOSE_CMD[*]} -p $PROJECT ${BASE_FILES[*]} logs agent-a" >&2
  exit 1
fi
echo "==> $AGENTS agents Ready ${took} s after \`up\`"
port="${CLOUDLESS_PROMETHEUS_PORT:-9090}"
echo "Prometheus: http://127.0.0.1:$port"
if [[ " ${COMPOSE_FILES[*]} " != *compose.local.yaml* ]]; then
  echo "Grafana:    http://127.0.0.1:${CLOUDLESS_GRAFANA_PORT:-3000} (anonymous viewer; admin / \${CLOUDLESS_GRAFANA_PASSWORD:-cloudless})"
fi
echo "cloudlessctl: scripts/compose-ctl.sh get nodes   (example: scripts/compose-ctl.sh apply -f /workloads/hello.yaml --wait)"
echo "Stop and remove everything: make compose-down"
