#!/bin/sh
# Entry point of cloudless/coordinator in the compose cluster.
#
# CL_NAME   this coordinator's name on the compose network (its advertised
#           host, which its certificate names): coordinator-1
# CL_ROLE   init: the founder. On the first start it makes the cluster's
#           master key in /cluster (a volume only the coordinators mount),
#           runs `init` (cluster CA, admin credentials) and publishes what
#           the others need: /cluster/identity.json (the sealed cluster
#           identity) and, in the admin volume at /admin, ca.crt, the admin
#           certificate and key and a cloudlessctl.toml naming every
#           coordinator (for the bootstrap job and the ctl service). Later
#           starts resume from the data dir.
#           join: waits for /cluster/identity.json, copies it into its data
#           dir and runs with --join CL_JOIN on the first start; later starts
#           resume from the data dir.
# CL_JOIN   host:port of the coordinator to join (default coordinator-1:7400)
# CL_SERVERS  the servers written into the published cloudlessctl.toml
# CL_ARGS   more flags for cloudless-coordinator (e.g. --set log_format=json)
set -eu

NAME="${CL_NAME:?CL_NAME is not set}"
ROLE="${CL_ROLE:-join}"
DATA=/var/lib/cloudless/coordinator
SHARED=/cluster
ADMIN=/admin
SERVERS="${CL_SERVERS:-coordinator-1:7400,coordinator-2:7400,coordinator-3:7400}"

set -- --data-dir "$DATA" --listen 0.0.0.0:7400 --advertise "$NAME:7400" \
  --http 0.0.0.0:7401 --set "master_key_file=$SHARED/master.key"
# shellcheck disable=SC2086
[ -n "${CL_ARGS:-}" ] && set -- "$@" ${CL_ARGS}

# Writes SRC to DEST through a temporary file, so readers never see half a file.
publish() { # src dest mode
  cp "$1" "$2.tmp.$$" && chmod "$3" "$2.tmp.$$" && mv "$2.tmp.$$" "$2"
}

# The founder's files for the others, once `init` has written them.
publish_cluster() {
  for _ in $(seq 1 600); do
    [ -f "$DATA/tls/identity.json" ] && [ -f "$DATA/admin/admin.key" ] && [ -f "$DATA/admin/admin.crt" ] && break
    sleep 0.1
  done
  if [ ! -f "$SHARED/identity.json" ]; then
    publish "$DATA/tls/identity.json" "$SHARED/identity.json" 0600
  fi
  if [ ! -f "$ADMIN/cloudlessctl.toml" ]; then
    mkdir -p "$ADMIN"
    chmod 0700 "$ADMIN"
    publish "$DATA/admin/ca.crt" "$ADMIN/ca.crt" 0644
    publish "$DATA/admin/admin.key" "$ADMIN/admin.key" 0600
    publish "$DATA/admin/admin.crt" "$ADMIN/admin.crt" 0644
    servers=""
    for s in $(echo "$SERVERS" | tr ',' ' '); do servers="$servers${servers:+, }\"$s\""; done
    cat >"$ADMIN/cloudlessctl.toml.tmp" <<EOF
# cloudlessctl configuration for admin "admin" of the compose cluster,
# written by $NAME. cloudlessctl renews admin.crt in place.
servers = [$servers]
ca = "$ADMIN/ca.crt"
cert = "$ADMIN/admin.crt"
key = "$ADMIN/admin.key"
EOF
    chmod 0600 "$ADMIN/cloudlessctl.toml.tmp"
    mv "$ADMIN/cloudlessctl.toml.tmp" "$ADMIN/cloudlessctl.toml"
  fi
  echo "coordinator-entrypoint: published $SHARED/identity.json and the admin credentials in $ADMIN" >&2
}

pid=""
forward() { if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; fi; }
trap forward TERM INT

mkdir -p "$DATA"
case "$ROLE" in
  init)
    if [ ! -f "$SHARED/master.key" ]; then
      cloudless-coordinator gen-master-key "$SHARED/master.key.new" >&2
      mv "$SHARED/master.key.new" "$SHARED/master.key"
    fi
    cloudless-coordinator init "$@" &
    pid=$!
    publish_cluster &
    ;;
  join)
    echo "coordinator-entrypoint: waiting for the cluster identity in $SHARED" >&2
    until [ -f "$SHARED/identity.json" ] && [ -f "$SHARED/master.key" ]; do sleep 0.1; done
    if [ -f "$DATA/node_id" ]; then
      cloudless-coordinator run "$@" &
    else
      mkdir -p "$DATA/tls"
      chmod 0700 "$DATA" "$DATA/tls"
      [ -f "$DATA/tls/identity.json" ] || publish "$SHARED/identity.json" "$DATA/tls/identity.json" 0600
      cloudless-coordinator run "$@" --join "${CL_JOIN:-coordinator-1:7400}" &
    fi
    pid=$!
    ;;
  *)
    echo "coordinator-entrypoint: CL_ROLE must be init or join, not $ROLE" >&2
    exit 2
    ;;
esac

# Wait for the coordinator (again after a forwarded signal interrupts wait).
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && status=0 || status=$?
done
exit "$status"
