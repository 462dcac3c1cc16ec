#!/usr/bin/env bash
# Builds the images of the compose dev cluster (deployments/compose/) from the
# release binaries, without pulling anything: each image is a root file
# system assembled here (the binaries, the shared libraries `ldd` lists,
# busybox and a few /etc files) and loaded with `docker import`.
#
#   cloudless/coordinator   cloudless-coordinator
#   cloudless/agent         cloudless-agent + containerd, runc, ctr, the CNI
#                           plugins, ip/bridge, iptables (nft), nft, conntrack
#   cloudless/cloudlessctl  cloudlessctl (also the cluster's bootstrap job)
#   cloudless/registry      Debian's docker-registry holding a busybox image
#                           (registry:5000/cloudless/busybox:1), the image
#                           the example workloads run
#   cloudless/prometheus-local  Debian's prometheus and promtool, for machines
#                           that cannot pull prom/prometheus
#
# Needs: docker, the binaries of the `dist` profile (built here with cargo
# unless CLOUDLESS_BIN names a directory holding them), and from Debian
# (scripts/install-deps.sh): containerd, runc, containernetworking-plugins,
# iproute2, iptables, nftables, conntrack, busybox-static, docker-registry;
# prometheus for cloudless/prometheus-local (skipped with a note when absent).
#
#   scripts/images.sh [coordinator|agent|cloudlessctl|registry|prometheus-local ...]
# Tag: ${CLOUDLESS_TAG:-dev}.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
TAG="${CLOUDLESS_TAG:-dev}"
BIN="${CLOUDLESS_BIN:-target/dist}"
IMAGES_DIR=deployments/compose/images
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cloudless-images.XXXXXX")"
REGISTRY_PID=""
cleanup() {
  [[ -n "$REGISTRY_PID" ]] && kill "$REGISTRY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

die() { echo "images.sh: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is missing"
docker info >/dev/null 2>&1 || die "cannot talk to the docker engine (is it running, may this user use it?)"

WANT=("$@")
[[ ${#WANT[@]} -gt 0 ]] || WANT=(coordinator agent cloudlessctl registry prometheus-local)
wants() { local w; for w in "${WANT[@]}"; do [[ "$w" == "$1" ]] && return 0; done; return 1; }

# The binaries users run (`make dist`): built once here unless CLOUDLESS_BIN
# says where they are.
NEED_BINS=(cloudless-coordinator cloudless-agent cloudlessctl cloudless-image)
missing=()
for b in "${NEED_BINS[@]}"; do [[ -x "$BIN/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  [[ -z "${CLOUDLESS_BIN:-}" ]] || die "$BIN lacks ${missing[*]}"
  echo "==> building the dist binaries (${missing[*]} missing; link-time optimised, a few minutes)"
  cargo build --profile dist -p cloudless-coordinator -p cloudless-agent -p cloudless-cli \
    -p cloudless-runtime --bins
fi

# Copies FILE (following links) to ROOT/DEST (default: the same path), with
# debug information stripped from ELF files when `strip` is there, and the
# shared libraries it needs.
add_file() { # root file [dest]
  local root=$1 src=$2 dest=${3:-$2}
  [[ -e "$src" ]] || die "$src is missing (scripts/install-deps.sh installs it)"
  mkdir -p "$root$(dirname "$dest")"
  rm -f "$root$dest"
  cp -L "$src" "$root$dest"
  if command -v strip >/dev/null && head -c 4 "$src" | grep -q ELF; then
    strip --strip-debug "$root$dest" 2>/dev/null || true
  fi
  add_libs "$root" "$src"
}

# The shared libraries (and the loader) `ldd` lists for FILE, at the same
# paths inside ROOT.
add_libs() { # root file
  local root=$1 file=$2 lib
  { ldd "$file" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
    while read -r lib; do
      [[ -e "$root$lib" ]] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
}

# Busybox as /bin/busybox with a link per applet, except where ROOT already
# has a real program of that name.
add_busybox() { # root
  local root=$1 applet
  local bb=/bin/busybox
  [[ -x "$bb" ]] || die "/bin/busybox is missing (Debian busybox-static)"
  ldd "$bb" >/dev/null 2>&1 && die "/bin/busybox is not static (install busybox-static)"
  mkdir -p "$root/bin" "$root/usr/bin" "$root/sbin" "$root/usr/sbin"
  cp "$bb" "$root/bin/busybox"
  for applet in $("$bb" --list); do
    [[ "$applet" == busybox ]] && continue
    if [[ -e "$root/bin/$applet" || -e "$root/usr/bin/$applet" || -e "$root/sbin/$applet" || -e "$root/usr/sbin/$applet" ]]; then
      continue
    fi
    ln -s busybox "$root/bin/$applet"
  done
}

# /etc basics: users, groups, name resolution order, protocols and services
# (iptables and Go programs read them), and the directories every image has.
add_etc() { # root
  local root=$1
  mkdir -p "$root/etc" "$root/tmp" "$root/root" "$root/var/tmp" "$root/var/log" "$root/run" "$root/proc" "$root/sys" "$root/dev"
  chmod 1777 "$root/tmp" "$root/var/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  local f
  for f in /etc/protocols /etc/services /etc/ethertypes; do
    [[ -e "$f" ]] && cp -L "$f" "$root$f"
  done
  return 0
}

# Loads ROOT as image NAME with the given `docker import --change` lines.
import() { # root name change...
  local root=$1 name=$2; shift 2
  local changes=() c
  for c in "$@"; do changes+=(--change "$c"); done
  changes+=(--change "LABEL org.opencontainers.image.source=cloudless" --change "LABEL cloudless.built-by=scripts/images.sh")
  tar -C "$root" --numeric-owner -cf - . | docker import "${changes[@]}" - "$name:$TAG" >/dev/null
  echo "    $name:$TAG ($(du -sh "$root" | cut -f1) on disk)"
}

PATH_ENV="ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

if wants coordinator; then
  echo "==> cloudless/coordinator"
  root="$WORK/coordinator"; mkdir -p "$root"
  add_etc "$root"
  add_file "$root" "$BIN/cloudless-coordinator" /usr/local/bin/cloudless-coordinator
  add_file "$root" "$IMAGES_DIR/coordinator-entrypoint.sh" /usr/local/bin/coordinator-entrypoint
  chmod 0755 "$root/usr/local/bin/coordinator-entrypoint"
  add_busybox "$root"
  mkdir -p "$root/var/lib/cloudless/coordinator"
  import "$root" cloudless/coordinator "$PATH_ENV" \
    'ENTRYPOINT ["/usr/local/bin/coordinator-entrypoint"]' 'EXPOSE 7400 7401 7400/udp'
fi

if wants agent; then
  echo "==> cloudless/agent"
  root="$WORK/agent"; mkdir -p "$root"
  add_etc "$root"
  add_file "$root" "$BIN/cloudless-agent" /usr/local/bin/cloudless-agent
  add_file "$root" "$IMAGES_DIR/agent-entrypoint.sh" /usr/local/bin/agent-entrypoint
  chmod 0755 "$root/usr/local/bin/agent-entrypoint"
  add_file "$root" "$IMAGES_DIR/containerd-config.toml" /etc/containerd/config.toml
  for b in /usr/bin/containerd /usr/bin/containerd-shim-runc-v2 /usr/bin/ctr; do add_file "$root" "$b"; done
  add_file "$root" "$(command -v runc)" /usr/sbin/runc
  # The CNI plugins: every one Debian ships (bridge, host-local, portmap,
  # firewall, bandwidth, loopback, tuning, ...).
  for p in /usr/lib/cni/*; do add_file "$root" "$p"; done
  # What the agent's network code runs: ip and bridge (iproute2), iptables
  # and iptables-restore (the nft backend, as on the host), nft, conntrack.
  add_file "$root" "$(readlink -f "$(command -v ip)")" /usr/sbin/ip
  add_file "$root" "$(readlink -f "$(command -v bridge)")" /usr/sbin/bridge
  add_file "$root" "$(readlink -f "$(command -v nft)")" /usr/sbin/nft
  add_file "$root" "$(readlink -f "$(command -v conntrack)")" /usr/sbin/conntrack
  xt="$(readlink -f /usr/sbin/xtables-nft-multi)"
  add_file "$root" "$xt" /usr/sbin/xtables-nft-multi
  for l in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
    ln -sf xtables-nft-multi "$root/usr/sbin/$l"
  done
  xtdir=/usr/lib/x86_64-linux-gnu/xtables
  [[ -d "$xtdir" ]] || xtdir="$(dirname "$(find /usr/lib /lib -name 'libxt_MASQUERADE.so' -print -quit 2>/dev/null)")"
  if [[ -d "$xtdir" ]]; then
    mkdir -p "$root$xtdir"
    for so in "$xtdir"/*.so; do cp -L "$so" "$root$so"; add_libs "$root" "$so"; done
  fi
  [[ -d /etc/iproute2 ]] && cp -rL /etc/iproute2 "$root/etc/iproute2"
  add_busybox "$root"
  mkdir -p "$root/var/lib/cloudless/agent" "$root/var/lib/containerd" "$root/run/containerd" "$root/etc/cloudless/seccomp"
  import "$root" cloudless/agent "$PATH_ENV" \
    'ENTRYPOINT ["/usr/local/bin/agent-entrypoint"]' 'EXPOSE 9464 7600/udp'
fi

if wants cloudlessctl; then
  echo "==> cloudless/cloudlessctl"
  root="$WORK/cloudlessctl"; mkdir -p "$root"
  add_etc "$root"
  add_file "$root" "$BIN/cloudlessctl" /usr/local/bin/cloudlessctl
  add_file "$root" "$IMAGES_DIR/bootstrap.sh" /usr/local/bin/cloudless-bootstrap
  add_file "$root" "$IMAGES_DIR/toolbox.sh" /usr/local/bin/cloudless-toolbox
  chmod 0755 "$root/usr/local/bin/cloudless-bootstrap" "$root/usr/local/bin/cloudless-toolbox"
  mkdir -p "$root/workloads"
  cp deployments/compose/workloads/*.yaml "$root/workloads/"
  add_busybox "$root"
  import "$root" cloudless/cloudlessctl "$PATH_ENV" \
    'ENV CLOUDLESSCTL_CONFIG=/admin/cloudlessctl.toml' 'ENTRYPOINT ["/usr/local/bin/cloudlessctl"]'
fi

if wants registry; then
  echo "==> cloudless/registry (busybox image pushed as cloudless/busybox:1)"
  command -v docker-registry >/dev/null || die "docker-registry is missing (Debian docker-registry)"
  root="$WORK/registry"; mkdir -p "$root"
  add_etc "$root"
  add_file "$root" "$(command -v docker-registry)" /usr/local/bin/docker-registry
  add_file "$root" "$IMAGES_DIR/registry-config.yml" /etc/docker/registry/config.yml
  add_busybox "$root"
  # Fill its storage now: a registry on a free loopback port of this host,
  # writing into the image's root, and the host's busybox pushed to it.
  mkdir -p "$root/var/lib/registry"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  cat >"$WORK/registry-fill.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $root/var/lib/registry
http:
  addr: 127.0.0.1:$port
YAML
  docker-registry serve "$WORK/registry-fill.yml" >"$WORK/registry-fill.log" 2>&1 &
  REGISTRY_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
  "$BIN/cloudless-image" busybox "$WORK/busybox.tar" >/dev/null
  "$BIN/cloudless-image" push "$WORK/busybox.tar" "127.0.0.1:$port/cloudless/busybox:1" --insecure | sed 's/^/    /'
  kill "$REGISTRY_PID"; wait "$REGISTRY_PID" 2>/dev/null || true; REGISTRY_PID=""
  import "$root" cloudless/registry "$PATH_ENV" \
    'ENTRYPOINT ["/usr/local/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"]' 'EXPOSE 5000'
fi

if wants prometheus-local; then
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "==> cloudless/prometheus-local skipped: install Debian's prometheus package (apt-get install prometheus)"
  else
    echo "==> cloudless/prometheus-local ($(prometheus --version 2>&1 | head -1))"
    root="$WORK/prometheus"; mkdir -p "$root"
    add_etc "$root"
    # The paths of the official image (prom/prometheus), so one compose
    # service definition fits both.
    add_file "$root" "$(command -v prometheus)" /bin/prometheus
    add_file "$root" "$(command -v promtool)" /bin/promtool
    add_busybox "$root"
    mkdir -p "$root/etc/prometheus" "$root/prometheus"
    chown 65534:65534 "$root/prometheus"
    import "$root" cloudless/prometheus-local "$PATH_ENV" 'USER 65534' 'WORKDIR /prometheus' \
      'ENTRYPOINT ["/bin/prometheus"]' \
      'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' 'EXPOSE 9090'
  fi
fi

# Earlier builds of these images that no tag names any more (and no
# container uses).
docker image prune -f --filter "label=cloudless.built-by=scripts/images.sh" >/dev/null 2>&1 || true
