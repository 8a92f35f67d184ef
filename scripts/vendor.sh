#!/usr/bin/env bash
# The forks under vendor/ are upstream releases plus a patch each
# (vendor/README.md). This script keeps that true.
#
#   scripts/vendor.sh check   every vendor/CRATE equals upstream + vendor/CRATE.patch
#                             (CI runs this; exit 1 and the difference if not)
#   scripts/vendor.sh diff    rewrite vendor/CRATE.patch from upstream and
#                             vendor/CRATE (after editing a fork)
#
# Upstream sources come from crates.io through `cargo vendor`, at the version
# each fork's Cargo.toml carries. Files that upstream packages but a fork
# leaves out (CI and editor settings, a lockfile, a logo) are listed in
# OMITTED; everything else must match byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."

CRATES=(amq-protocol-types amq-protocol lapin)
OMITTED=(.cargo-checksum.json .cargo_vcs_info.json .editorconfig .github AGENTS.md
    Cargo.lock Cargo.toml.orig logo.jpg regen-code.sh)

usage() { echo "usage: scripts/vendor.sh check|diff" >&2; exit 2; }
[ $# -eq 1 ] || usage
mode=$1
case "$mode" in check | diff) ;; *) usage ;; esac

version_of() { sed -n 's/^version = "\(.*\)"$/\1/p' "vendor/$1/Cargo.toml" | head -n1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One throwaway crate that depends on every upstream release; `cargo vendor`
# unpacks exactly what crates.io serves.
mkdir -p "$work/fetch/src"
: >"$work/fetch/src/lib.rs"
{
    printf '[package]\nname = "vendor-upstream"\nversion = "0.0.0"\nedition = "2021"\n'
    printf '[workspace]\n[dependencies]\n'
    for crate in "${CRATES[@]}"; do
        printf '%s = { version = "=%s", default-features = false }\n' "$crate" "$(version_of "$crate")"
    done
} >"$work/fetch/Cargo.toml"
(cd "$work/fetch" && cargo vendor --quiet --versioned-dirs "$work/upstream" >/dev/null) || {
    echo "scripts/vendor.sh: could not fetch the upstream releases from crates.io" >&2
    exit 1
}

status=0
for crate in "${CRATES[@]}"; do
    version=$(version_of "$crate")
    a="$work/a/$crate"
    b="$work/b/$crate"
    mkdir -p "$work/a" "$work/b"
    cp -r "$work/upstream/$crate-$version" "$a"
    for name in "${OMITTED[@]}"; do rm -rf "${a:?}/$name"; done
    case "$mode" in
    check)
        cp -r "$a" "$b"
        if ! (cd "$b" && patch --quiet -p1 --no-backup-if-mismatch <"$OLDPWD/vendor/$crate.patch" >/dev/null); then
            echo "vendor/$crate.patch no longer applies to $crate $version from crates.io" >&2
            status=1
            continue
        fi
        if diff -r "$b" "vendor/$crate" >"$work/drift"; then
            echo "vendor/$crate = $crate $version from crates.io + vendor/$crate.patch"
        else
            echo "vendor/$crate has drifted from $crate $version + vendor/$crate.patch:" >&2
            sed "s#$work/b/##" "$work/drift" | head -n 60 >&2
            echo "(edit the fork, then scripts/vendor.sh diff to record it in the patch)" >&2
            status=1
        fi
        ;;
    diff)
        rm -rf "$b"
        cp -r "vendor/$crate" "$b"
        # a/ and b/ prefixes for patch -p1; no timestamps, so the file only
        # changes when the content does.
        (cd "$work" && diff -ruN "a/$crate" "b/$crate" || true) |
            sed -E -e 's#^(---|\+\+\+) ([ab])/[^/]+/([^\t]*).*#\1 \2/\3#' \
                -e "s#^diff -ruN a/$crate/(.*) b/$crate/.*#diff -ruN a/\1 b/\1#" >"vendor/$crate.patch"
        echo "wrote vendor/$crate.patch ($(grep -c '^+++ ' "vendor/$crate.patch") files)"
        ;;
    esac
done
exit $status
