#!/bin/sh
# The compose cluster's one-shot bootstrap job (cloudless/cloudlessctl image):
# waits until coordinator-1 has initialised the cluster and published the
# admin credentials to /admin, waits until the cluster has 3 voters (one
# leader, two followers), then writes to the enroll volume (/enroll, which
# the agents mount read-only) the cluster CA certificate and a single-use
# join token for each agent that is not enrolled yet,
# /enroll/tokens/<agent>.token, labelled with its zone. The agents enroll
# with them by themselves; exit code 0 lets them start (depends_on:
# service_completed_successfully). The master key never leaves the
# coordinators' volume.
#
# CL_AGENTS   agent:zone pairs (default "agent-a:a agent-b:b agent-c:c")
# CL_VOTERS   voters to wait for (default 3)
# CL_TIMEOUT  seconds to wait for each step (default 180)
set -eu

AGENTS="${CL_AGENTS:-agent-a:a agent-b:b agent-c:c}"
VOTERS="${CL_VOTERS:-3}"
TIMEOUT="${CL_TIMEOUT:-180}"
export CLOUDLESSCTL_CONFIG="${CLOUDLESSCTL_CONFIG:-/admin/cloudlessctl.toml}"
TOKENS=/enroll/tokens
log() { echo "bootstrap: $*" >&2; }
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
waited() { [ "$(elapsed)" -lt "$TIMEOUT" ] || { log "gave up after $TIMEOUT s: $1"; exit 1; }; }

log "waiting for the admin credentials coordinator-1 publishes"
until [ -f "$CLOUDLESSCTL_CONFIG" ]; do waited "no $CLOUDLESSCTL_CONFIG"; sleep 0.2; done

log "waiting for $VOTERS voters"
while :; do
  n=$(cloudlessctl cluster status -o json 2>/dev/null | grep -c '"state": "\(Leader\|Follower\)"' || true)
  [ "${n:-0}" -ge "$VOTERS" ] && break
  waited "the cluster has ${n:-0} of $VOTERS voters"
  sleep 0.3
done
cloudlessctl cluster status >&2 || true

mkdir -p "$TOKENS"
chmod 0755 /enroll "$TOKENS"
cp /admin/ca.crt /enroll/ca.crt.tmp && chmod 0644 /enroll/ca.crt.tmp && mv /enroll/ca.crt.tmp /enroll/ca.crt
nodes=""
until nodes=$(cloudlessctl get nodes -o json 2>/dev/null); do waited "cannot list nodes"; sleep 0.3; done
for pair in $AGENTS; do
  name=${pair%%:*}
  zone=${pair#*:}
  if echo "$nodes" | grep -q "\"name\": \"$name\""; then
    log "$name is enrolled already"
    rm -f "$TOKENS/$name.token"
    continue
  fi
  until cloudlessctl token create --ttl 1h --max-uses 1 --label "zone=$zone" \
      >"$TOKENS/$name.token.tmp" 2>/dev/null; do
    waited "cannot create a join token"
    sleep 0.3
  done
  chmod 0644 "$TOKENS/$name.token.tmp"
  mv "$TOKENS/$name.token.tmp" "$TOKENS/$name.token"
  log "join token for $name (zone=$zone) written to $TOKENS/$name.token"
done
log "done in $(elapsed) s"
