#!/usr/bin/env bash
# Installs what building and testing Cloudless needs on Debian/Ubuntu:
# protoc (tonic code generation), curl, a C toolchain, containerd and runc,
# busybox-static (the test image), apparmor (apparmor_parser, to check the
# agent's generated profile) and docker-registry (the registry the pull
# tests serve it from), iproute2 and iptables (the network-cut and NAT
# traversal tests' namespaces and routers), containernetworking-plugins
# (the CNI plugins that give each replica its network), prometheus
# (promtool and the compose dev cluster's local Prometheus image) with
# python3-yaml (the compose test's checks of rules and dashboards), and
# Rust if missing. Docker Engine with docker-compose (the compose dev
# cluster) is expected on the machine.
set -euo pipefail
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
  protobuf-compiler build-essential pkg-config curl ca-certificates git \
  containerd runc busybox-static apparmor docker-registry iproute2 iptables \
  containernetworking-plugins nftables conntrack prometheus python3-yaml
if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "cargo is in $HOME/.cargo/bin: add it to PATH" >&2
  else
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
