#!/bin/sh
# The compose cluster's `ctl` service: stays up so that
#   docker-compose exec ctl cloudlessctl get nodes
# (scripts/compose-ctl.sh) runs cloudlessctl against the cluster with the
# admin credentials in /admin. Example workloads are in /workloads.
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
