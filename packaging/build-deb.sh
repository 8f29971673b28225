#!/bin/bash
# Build the Debian package of tunvpnd from this checkout, as root on Debian 12:
#
#   bash packaging/build-deb.sh              -> dist/tunvpnd_<version>_all.deb
#   bash packaging/build-deb.sh --lint       ... and run lintian on it
#
# What it does:
#   1. installs the build dependencies with apt-get if any is missing;
#   2. copies the working tree (uncommitted work included; without .git and whatever
#      .gitignore ignores: build/, *.egg-info, __pycache__, dist/, ...) to a temporary directory,
#      with packaging/debian/ as debian/ at its root;
#   3. runs `dpkg-buildpackage -us -uc -b` there (dh + pybuild's pyproject plugin);
#   4. copies the .deb to dist/ (or $TUNVPN_DEB_OUT) and removes the temporary directory.
# The version comes from debian/changelog, which must agree with pyproject.toml (checked).
set -euo pipefail
# Debian's tools and Debian's Python only: not a pyenv, venv or /usr/local python3 first in PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE VIRTUAL_ENV PYENV_VERSION PIP_FIND_LINKS

lint=0
for arg in "$@"; do
    case $arg in
        --lint) lint=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--lint]" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${TUNVPN_DEB_OUT:-$repo/dist}

build_deps="build-essential dpkg-dev debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject
            python3-yaml python3-pyroute2 python3-sdnotify python3-cryptography python3-nacl
            python3-prometheus-client"
[ "$lint" = 1 ] && build_deps="$build_deps lintian"
missing=""
for p in $build_deps; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "build-deb: installing$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The version: debian/changelog's upstream part must be pyproject.toml's version.
version=$(dpkg-parsechangelog -l "$repo/packaging/debian/changelog" -S Version)
upstream=${version%-*}
project=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n1)
if [ "$upstream" != "$project" ]; then
    echo "build-deb: packaging/debian/changelog says $version but pyproject.toml says" \
         "$project: add a changelog entry (dch -v $project-1)" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/tunvpnd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/tunvpnd-$upstream
mkdir "$src"

# The working tree as it is now, not HEAD: tracked and untracked files that git does not
# ignore, skipping tracked files deleted in the working tree. Without git: plain excludes.
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && while IFS= read -r -d '' f; do
               if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
           done) \
        | sort -zu \
        | tar -C "$repo" --null -T - -cf - \
        | tar -C "$src" -xf -
else
    tar -C "$repo" --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -cf - . \
        | tar -C "$src" -xf -
fi
rm -rf "$src/debian"
cp -a "$repo/packaging/debian" "$src/debian"

(cd "$src" && dpkg-buildpackage -us -uc -b)

deb=tunvpnd_${version#*:}_all.deb
mkdir -p "$out"
cp "$work/$deb" "$out/$deb"
echo "build-deb: $out/$deb"
if [ "$lint" = 1 ]; then
    lintian --info "$out/$deb"
fi
