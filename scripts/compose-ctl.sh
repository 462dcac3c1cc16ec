#!/usr/bin/env bash
# cloudlessctl against the compose dev cluster, run in its ctl service with
# the admin credentials: scripts/compose-ctl.sh get nodes
# The example workloads are in the image under /workloads:
#   scripts/compose-ctl.sh apply -f /workloads/hello.yaml --wait
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/compose-lib.sh
source scripts/compose-lib.sh
if [[ -t 0 && -t 1 ]]; then
  compose exec ctl cloudlessctl "$@"
else
  compose exec -T ctl cloudlessctl "$@"
fi
