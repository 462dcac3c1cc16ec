#!/bin/sh
# Entry point of cloudless/agent in the compose cluster: one container is one
# device, with a containerd of its own that runs the replicas assigned to it.
#
# CL_ZONE          the device's zone (its join token carries zone=<zone>)
# CL_NAME          node name (default agent-<zone>)
# CL_COORDINATORS  coordinators (default coordinator-1:7400,coordinator-2:7400,coordinator-3:7400)
# CL_REGISTRY      plain-HTTP registry (default registry:5000)
# CL_METRICS_ADDR  where /metrics, /healthz and /readyz listen (default
#                  0.0.0.0:9464)
# CL_ARGS          more flags for cloudless-agent (e.g. --no-container-network)
#
# First start: waits for /enroll/tokens/<name>.token and /enroll/ca.crt
# (written by the bootstrap job) and enrolls with it. Later starts (the data dir holds
# node.crt) need no token.
set -eu

ZONE="${CL_ZONE:?CL_ZONE is not set}"
NAME="${CL_NAME:-agent-$ZONE}"
DATA=/var/lib/cloudless/agent
COORDS="${CL_COORDINATORS:-coordinator-1:7400,coordinator-2:7400,coordinator-3:7400}"
REGISTRY="${CL_REGISTRY:-registry:5000}"
METRICS="${CL_METRICS_ADDR:-0.0.0.0:9464}"
TOKEN="/enroll/tokens/$NAME.token"

log() { echo "agent-entrypoint: $*" >&2; }

# Docker mounts /proc/sys read-only; the CNI plugins and the agent set
# per-namespace network sysctls (forwarding, route_localnet). With
# CAP_SYS_ADMIN and no AppArmor confinement it can be made writable; the
# network namespace is the container's own, so nothing leaks to the host.
if ! mount -o remount,rw /proc/sys 2>/dev/null; then
  log "could not make /proc/sys writable; relying on the sysctls compose.yaml sets"
fi
# The host's cgroup hierarchy (mounted from the host in compose.yaml) is
# where runc puts each replica: /<namespace>/<replica>.
[ -w /sys/fs/cgroup ] || log "warning: /sys/fs/cgroup is not writable; replicas cannot start"

mkdir -p /run/containerd /var/lib/containerd /run/cloudless/netns /var/log "$DATA"
containerd --config /etc/containerd/config.toml >/var/log/containerd.log 2>&1 &
containerd_pid=$!
for _ in $(seq 1 200); do
  [ -S /run/containerd/containerd.sock ] && break
  kill -0 "$containerd_pid" 2>/dev/null || { log "containerd exited:"; cat /var/log/containerd.log >&2; exit 1; }
  sleep 0.05
done
log "containerd $(containerd --version | awk '{print $3}') is up (log: /var/log/containerd.log)"

set -- --data-dir "$DATA" --name "$NAME" --coordinator "$COORDS" \
  --containerd-socket /run/containerd/containerd.sock --containerd-namespace "cloudless-$NAME" \
  --insecure-registry "$REGISTRY" --firewall-chain-prefix CLOUDLESS
set -- "$@" --metrics-addr "$METRICS"
if [ ! -f "$DATA/node.crt" ]; then
  log "not enrolled yet: waiting for $TOKEN"
  until [ -s "$TOKEN" ] && [ -s /enroll/ca.crt ]; do sleep 0.1; done
  set -- "$@" --join-token-file "$TOKEN" --ca-cert /enroll/ca.crt
fi
# shellcheck disable=SC2086
[ -n "${CL_ARGS:-}" ] && set -- "$@" ${CL_ARGS}

pid=""
forward() { if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; fi; }
trap forward TERM INT
cloudless-agent "$@" &
pid=$!
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && status=0 || status=$?
done
log "cloudless-agent exited with $status"
# Stopping the agent leaves its containers running (edge autonomy); here the
# container ends and takes containerd, the shims and the replicas with it.
kill -TERM "$containerd_pid" 2>/dev/null || true
exit "$status"
