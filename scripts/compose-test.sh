#!/usr/bin/env bash
# `make compose-test`: the compose dev cluster end to end.
#   1. builds the images (scripts/images.sh; CLOUDLESS_SKIP_IMAGES=1 skips)
#      and checks the observability files (dashboards, provisioning, rules)
#   2. brings the cluster up from nothing, waits until 3 agents are Ready
#   3. applies deployments/compose/workloads/hello.yaml, sees every replica
#      Ready and its output in `cloudlessctl logs`
#   4. evaluates every dashboard panel query and alert expression against the
#      live Prometheus (core panels must return data, every metric a query
#      names must be exported, every target must be up), runs promtool check
#      config and promtool test rules
#   5. stops one agent container and sees its replicas replaced on the others
#   6. takes everything down and checks that no container, network or volume
#      of the project is left
# Prints the time from `up` (images built) to 3 agents Ready and to the
# workload Running.
#   CLOUDLESS_COMPOSE_KEEP=1             leave the cluster up at the end (and on failure)
#   CLOUDLESS_ALLOW_MISSING_METRICS=1    report metrics nobody exports and down
#                                        targets instead of failing
#   CLOUDLESS_COMPOSE_LOCAL, CLOUDLESS_COMPOSE_PROJECT: see scripts/compose-lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/compose-lib.sh
source scripts/compose-lib.sh

PROM="http://127.0.0.1:${CLOUDLESS_PROMETHEUS_PORT:-9090}"
WORKLOAD=deployments/compose/workloads/hello.yaml
TMP="$(mktemp -d "${TMPDIR:-/tmp}/cloudless-compose-test.XXXXXX")"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
step() { echo; echo "==> $*"; }
fail() { echo "compose-test: FAIL: $*" >&2; exit 1; }

finish() {
  local code=$?
  if [[ $code -ne 0 ]]; then
    echo
    echo "compose-test: failed; state of the cluster:" >&2
    compose ps >&2 || true
    for s in coordinator-1 bootstrap agent-a agent-b agent-c prometheus; do
      echo "--- last log lines of $s" >&2
      compose logs --no-color --tail 15 "$s" >&2 2>/dev/null || true
    done
  fi
  if [[ "${CLOUDLESS_COMPOSE_KEEP:-0}" == 1 ]]; then
    echo "compose-test: cluster left running (CLOUDLESS_COMPOSE_KEEP=1); make compose-down removes it"
  elif [[ $code -ne 0 ]]; then
    scripts/compose-down.sh >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
  exit $code
}
trap finish EXIT

command -v python3 >/dev/null || fail "python3 is needed"
command -v curl >/dev/null || fail "curl is needed"

step "removing what an earlier run left"
scripts/compose-down.sh

if [[ "${CLOUDLESS_SKIP_IMAGES:-0}" != 1 ]]; then
  step "building the images"
  scripts/images.sh
fi

step "checking dashboards, Grafana provisioning and alert rules (files)"
python3 deployments/compose/tests/check_observability.py

choose_files
step "docker-compose ${COMPOSE_FILES[*]} up -d"
t0=$(now)
"${COMPOSE_CMD[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" up -d

step "waiting for 3 Ready agents"
ready=0
for _ in $(seq 1 360); do
  ready=$(ctl get nodes -o json 2>/dev/null | grep -c '"phase": "Ready"' || true)
  [[ "$ready" -ge 3 ]] && break
  sleep 0.25
done
[[ "$ready" -ge 3 ]] || fail "$ready of 3 agents Ready after $(since "$t0") s"
t_ready=$(since "$t0")
ctl get nodes
for zone in a b c; do
  ctl get nodes -o json | tr -d ' \n' | grep -q "\"name\":\"agent-$zone\"" || fail "no node agent-$zone"
done

step "applying $WORKLOAD"
ctl apply -f "/workloads/$(basename "$WORKLOAD")" --wait --timeout 120 ||
  fail "the workload did not become Ready"
t_running=$(since "$t0")
ctl get replicas -o wide
ctl get replicas -o json >"$TMP/replicas.json"
python3 - "$TMP/replicas.json" <<'PY' || fail "not every replica is Ready/Running"
import json, sys
rs = [r for r in json.load(open(sys.argv[1])) if r["workload"] == "hello"]
bad = [r for r in rs if r["state"] not in ("Running", "Ready")]
assert len(rs) == 3 and not bad, (len(rs), bad)
print(f"    3 replicas on {sorted(r['nodeName'] for r in rs)}, all {sorted({r['state'] for r in rs})}")
PY

step "cloudlessctl logs hello (every replica's output)"
ok=0
for _ in $(seq 1 30); do
  ctl logs hello --tail 2 >"$TMP/logs.txt" 2>&1 || true
  ok=1
  for id in $(python3 -c 'import json,sys; print(" ".join(r["id"] for r in json.load(open(sys.argv[1])) if r["workload"] == "hello"))' "$TMP/replicas.json"); do
    grep -q "hello from $id" "$TMP/logs.txt" || ok=0
  done
  [[ $ok == 1 ]] && break
  sleep 1
done
cat "$TMP/logs.txt"
[[ $ok == 1 ]] || fail "some replica's output is missing from cloudlessctl logs"

step "Prometheus: every target up, every panel query and alert expression"
for _ in $(seq 1 120); do curl -sf "$PROM/-/ready" >/dev/null && break; sleep 0.5; done
curl -sf "$PROM/-/ready" >/dev/null || fail "Prometheus at $PROM is not ready"
# Rate panels need two scrapes in their window; targets need one scrape each.
for _ in $(seq 1 60); do
  down=$(curl -sf "$PROM/api/v1/targets" | python3 -c 'import json,sys; print(sum(t["health"] != "up" for t in json.load(sys.stdin)["data"]["activeTargets"]))')
  [[ "$down" == 0 ]] && break
  sleep 1
done
sleep 12
compose exec -T coordinator-1 wget -qO- http://127.0.0.1:7401/metrics >"$TMP/coordinator.txt" ||
  fail "cannot read coordinator-1's /metrics"
compose exec -T agent-a wget -qO- http://127.0.0.1:9464/metrics >"$TMP/agent.txt" ||
  fail "cannot read agent-a's /metrics"
check_args=(--prometheus "$PROM" --metrics "$TMP/coordinator.txt" --metrics "$TMP/agent.txt"
  --expect-targets coordinator=3 --expect-targets agent=3)
[[ "${CLOUDLESS_ALLOW_MISSING_METRICS:-0}" == 1 ]] && check_args+=(--allow-missing-metrics)
python3 deployments/compose/tests/check_observability.py "${check_args[@]}" ||
  fail "dashboards or alert rules against the live Prometheus"

step "promtool check config; promtool test rules (in the Prometheus container)"
compose exec -T prometheus promtool check config /etc/prometheus/prometheus.yml
compose exec -T prometheus promtool test rules /etc/prometheus/rules/cloudless.rules.test.yml

victim=$(python3 -c 'import json,sys; print(sorted(r["nodeName"] for r in json.load(open(sys.argv[1])) if r["workload"] == "hello")[-1])' "$TMP/replicas.json")
step "stopping $victim's container; its replicas must be replaced on the other agents"
t_stop=$(now)
compose stop -t 15 "$victim"
replaced=0
for _ in $(seq 1 240); do
  if ctl get replicas -o json >"$TMP/after.json" 2>/dev/null && python3 - "$TMP/after.json" "$victim" <<'PY'
import json, sys
rs = [r for r in json.load(open(sys.argv[1])) if r["workload"] == "hello"]
ok = len(rs) == 3 and all(r["nodeName"] != sys.argv[2] and r["state"] in ("Running", "Ready") for r in rs)
sys.exit(0 if ok else 1)
PY
  then replaced=1; break; fi
  sleep 0.5
done
ctl get nodes
ctl get replicas
[[ $replaced == 1 ]] || fail "the replicas of $victim were not replaced within 120 s"
echo "    replaced $(since "$t_stop") s after the container was stopped"

if [[ "${CLOUDLESS_COMPOSE_KEEP:-0}" == 1 ]]; then
  echo
  echo "compose-test: PASS (CLOUDLESS_COMPOSE_KEEP=1: the cluster is left up, compose-down not checked)"
  echo "  up -> 3 agents Ready:      ${t_ready} s"
  echo "  up -> workload Running:    ${t_running} s (3 replicas Ready, output in logs)"
  exit 0
fi
step "make compose-down: nothing of project $PROJECT may be left"
scripts/compose-down.sh
label="label=com.docker.compose.project=$PROJECT"
left=$( { docker ps -aq --filter "$label"; docker network ls -q --filter "$label"; docker volume ls -q --filter "$label";
  docker ps -aq --filter "name=^${PROJECT}[_-]"; docker network ls -q --filter "name=^${PROJECT}_"; docker volume ls -q --filter "name=^${PROJECT}_"; } | wc -l)
[[ "$left" == 0 ]] || fail "$left container(s), network(s) or volume(s) left"

echo
echo "compose-test: PASS"
echo "  up -> 3 agents Ready:      ${t_ready} s"
echo "  up -> workload Running:    ${t_running} s (3 replicas Ready, output in logs)"
