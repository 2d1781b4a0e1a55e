#!/usr/bin/env bash
# A stand-in for python:3.11-slim, for builders that cannot reach a container registry
# (air-gapped builders, CI machines with only a Debian mirror): both Dockerfiles start
# FROM python:3.11-slim, and this makes an image of that name from Debian bookworm's
# packages (its python3 is 3.11), with `python` and `pip` on PATH as the official image
# has them. Run as root (debootstrap, or mmdebstrap where installed, needs it):
#
#   docker/build-offline-base.sh                 # podman, else docker
#   CONTAINER_ENGINE=docker docker/build-offline-base.sh
#   DEBIAN_MIRROR=http://mirror.example/debian docker/build-offline-base.sh
#
# Nothing is done when an image of that name is already there: the real one (pulled, or
# loaded with `docker load`), or a stand-in made by this very script (its sha256 is kept
# in a label, so an edit of the script makes the next run rebuild). Otherwise the real
# image is pulled when a registry answers (--no-pull skips the try), and failing that
# the stand-in is built (1 to 2.5 minutes). --force rebuilds it in any case. BASE_TAG
# names another image (default docker.io/library/python:3.11-slim).
set -euo pipefail

TAG=${BASE_TAG:-docker.io/library/python:3.11-slim}
SUITE=bookworm
LABEL=org.nextword.offline-base.sha256
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

pull=1
force=0
for arg in "$@"; do
  case $arg in
    --no-pull) pull=0 ;;
    --force) force=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  for candidate in podman docker; do
    if command -v "$candidate" >/dev/null 2>&1; then
      engine=$candidate
      break
    fi
  done
fi
if [ -z "$engine" ]; then
  echo "no container engine: install podman or docker, or set CONTAINER_ENGINE" >&2
  exit 1
fi

script_hash=$(sha256sum "$0" | cut -d' ' -f1)

if [ "$force" = 0 ] && "$engine" image inspect "$TAG" >/dev/null 2>&1; then
  built_by=$("$engine" image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$TAG")
  if [ -z "$built_by" ] || [ "$built_by" = "<no value>" ]; then
    echo "$TAG is here (not made by this script): nothing to do"
    exit 0
  fi
  if [ "$built_by" = "$script_hash" ]; then
    echo "$TAG is here (the stand-in of this script's version): nothing to do"
    exit 0
  fi
  echo "$TAG is a stand-in of another version of this script: rebuilding"
elif [ "$force" = 0 ] && [ "$pull" = 1 ] && "$engine" pull "$TAG" >/dev/null 2>&1; then
  echo "$TAG pulled from its registry"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "building the stand-in needs root (debootstrap)" >&2
  exit 1
fi
# mmdebstrap where installed: it resolves with apt and unpacks without dpkg's fsyncs,
# about twice as fast (127 s against 239 s on a loaded 2-core machine); the same tree.
if command -v mmdebstrap >/dev/null 2>&1; then
  bootstrap=(mmdebstrap --quiet --variant=minbase --include="$PACKAGES")
  # /usr merged by its hook, as debootstrap does it, rather than by the usrmerge package
  # (which would bring perl into the image).
  hooks=/usr/share/mmdebstrap/hooks/merged-usr
  [ -d "$hooks" ] && bootstrap+=(--hook-dir="$hooks")
elif command -v debootstrap >/dev/null 2>&1; then
  bootstrap=(debootstrap --variant=minbase --include="$PACKAGES")
else
  echo "debootstrap missing: apt-get install debootstrap (or mmdebstrap)" >&2
  exit 1
fi

# The mirror apt already uses (a machine without Internet access has one it can reach).
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources \
    2>/dev/null | grep -v -e security -m1 || true)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $3 ~ /^[a-z]+$/ && $2 !~ /security/ { print $2; exit }' \
    /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d "${TMPDIR:-/tmp}/offline-base.XXXXXX")
trap 'rm -rf "$root"' EXIT

echo "${bootstrap[0]} $SUITE from $mirror into $root"
"${bootstrap[@]}" "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 30 "$root.log" >&2
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"

# What python:3.11-slim offers that Debian spells differently: `python` and `pip`, and
# pip allowed to install into the system interpreter (PEP 668's marker would refuse).
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# Nothing the image needs at run time: package lists, caches, documentation.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*

tar -C "$root" --numeric-owner -c . |
  "$engine" import \
    --change "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["python3"]' \
    --change "LABEL $LABEL=$script_hash" \
    - "$TAG" >/dev/null
echo "$TAG built from Debian $SUITE ($("$engine" image inspect --format '{{ .Size }}' "$TAG") bytes)"
