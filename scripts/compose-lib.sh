# Shared by scripts/compose-{up,down,test,ctl}.sh (sourced, not run): which
# compose command, project and files the compose dev cluster uses.
#
#   CLOUDLESS_COMPOSE_PROJECT  project name (default cloudless)
#   CLOUDLESS_COMPOSE_LOCAL    auto (default): use compose.local.yaml (Prometheus
#                              from Debian's package, no Grafana) when
#                              prom/prometheus can be neither found nor pulled;
#                              1: always; 0: never
#   CLOUDLESS_PULL_TIMEOUT     seconds to try pulling the official images (default 60)

COMPOSE_DIR=deployments/compose
PROJECT="${CLOUDLESS_COMPOSE_PROJECT:-cloudless}"
export COMPOSE_PROJECT_NAME="$PROJECT"

if command -v docker-compose >/dev/null 2>&1; then
  COMPOSE_CMD=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE_CMD=(docker compose)
else
  echo "neither docker-compose nor the docker compose plugin is installed" >&2
  exit 1
fi

# The official images compose.yaml names (one place: the compose file).
prometheus_image() { grep -o 'prom/prometheus:v[0-9][0-9.]*' "$COMPOSE_DIR/compose.yaml" | head -1; }
grafana_image() { grep -o 'grafana/grafana:[0-9][0-9.]*' "$COMPOSE_DIR/compose.yaml" | head -1; }

# Whether IMAGE is here or can be pulled within the timeout.
have_or_pull() { # image
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  timeout "${CLOUDLESS_PULL_TIMEOUT:-60}" docker pull "$1" >/dev/null 2>&1
}

# Sets COMPOSE_FILES for `up`: the local override unless the official images
# are usable.
choose_files() {
  COMPOSE_FILES=(-f "$COMPOSE_DIR/compose.yaml")
  local mode="${CLOUDLESS_COMPOSE_LOCAL:-auto}"
  if [[ "$mode" == auto ]]; then
    if have_or_pull "$(prometheus_image)"; then
      mode=0
      have_or_pull "$(grafana_image)" ||
        echo "note: $(grafana_image) could not be pulled; compose will try again when it starts Grafana" >&2
    else
      echo "==> $(prometheus_image) can be neither found nor pulled: Prometheus from Debian's package (cloudless/prometheus-local), no Grafana" >&2
      mode=1
    fi
  fi
  if [[ "$mode" == 1 ]]; then
    COMPOSE_FILES+=(-f "$COMPOSE_DIR/compose.local.yaml")
  fi
}

# The files for commands that do not create anything (exec, logs, ps, down):
# the base file names every service.
BASE_FILES=(-f "$COMPOSE_DIR/compose.yaml")

compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" "${BASE_FILES[@]}" "$@"; }

# cloudlessctl in the running ctl service, with the admin credentials.
ctl() { compose exec -T ctl cloudlessctl "$@"; }
