#!/usr/bin/env bash
# `make compose-down`: removes every container, network and volume of the
# compose dev cluster, then the cgroups its agents' replicas left on the host
# (a stopped agent container takes its replicas with it, not their cgroup
# directories). Exit 1 if anything of the project is left.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/compose-lib.sh
source scripts/compose-lib.sh

compose down --volumes --remove-orphans --timeout 15 2>&1 | grep -v -e "^Network .* not found" -e "^Volume .* not found" -e "^Removing volume" -e "^Removing network" || true
# Anything compose did not know about (another file set, an interrupted up).
label="label=com.docker.compose.project=$PROJECT"
ids=$(docker ps -aq --filter "$label"); [[ -z "$ids" ]] || docker rm -f $ids >/dev/null
ids=$(docker network ls -q --filter "$label"); [[ -z "$ids" ]] || docker network rm $ids >/dev/null
ids=$(docker volume ls -q --filter "$label"); [[ -z "$ids" ]] || docker volume rm $ids >/dev/null

# Replica cgroups: /sys/fs/cgroup/<controller>/cloudless-agent-<zone>/<replica>
# (cgroup v1, the host's hierarchy mounted into the agents). Removed through
# the agent image, so no root on the host is needed.
if compgen -G "/sys/fs/cgroup/*/cloudless-agent-*" >/dev/null &&
  docker image inspect "cloudless/agent:${CLOUDLESS_TAG:-dev}" >/dev/null 2>&1; then
  docker run --rm --network none --entrypoint /bin/sh -v /sys/fs/cgroup:/sys/fs/cgroup \
    "cloudless/agent:${CLOUDLESS_TAG:-dev}" -c \
    'for d in /sys/fs/cgroup/*/cloudless-agent-*; do find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null; done; true'
fi

left=$( { docker ps -aq --filter "$label"; docker network ls -q --filter "$label"; docker volume ls -q --filter "$label"; } | wc -l)
if [[ "$left" -ne 0 ]]; then
  echo "compose-down: $left container(s), network(s) or volume(s) of project $PROJECT are left" >&2
  exit 1
fi
echo "compose-down: nothing of project $PROJECT is left"
