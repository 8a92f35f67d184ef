#!/usr/bin/env bash
# Builds tests/outside-app as a user's crate outside this checkout and runs
# its tests against the broker at AMQP_ADDR: it depends on rabbit-guard by
# path and nothing else (no [patch], no lapin of its own), so it proves that
# a dependent crate gets the forks under vendor/ and every guarantee.
#
# The copy also takes tests/hostile_messages.rs and tests/common/, which
# its tests share with rabbit-guard's own (see its Cargo.toml).
set -euo pipefail
checkout="$(cd "$(dirname "$0")/.." && pwd)"

outside=$(mktemp -d)
trap 'rm -rf "$outside"' EXIT
cp -r "$checkout/tests/outside-app" "$outside/outside-app"
rm -rf "$outside/outside-app/target" "$outside/outside-app/Cargo.lock"
cp "$checkout/tests/hostile_messages.rs" "$outside/"
cp -r "$checkout/tests/common" "$outside/common"

manifest="$outside/outside-app/Cargo.toml"
sed -i "s#^rabbit-guard = { path = \"../..\" }#rabbit-guard = { path = \"$checkout\" }#" "$manifest"
grep -q "^rabbit-guard = { path = \"$checkout\" }$" "$manifest" || {
    echo "scripts/outside-app.sh: tests/outside-app/Cargo.toml must depend on rabbit-guard = { path = \"../..\" }" >&2
    exit 1
}
if grep -qE '^\[patch|^lapin|^amq-protocol' "$manifest"; then
    echo "scripts/outside-app.sh: the application must not patch or depend on lapin itself" >&2
    exit 1
fi

echo "==> outside-app in $outside (rabbit-guard from $checkout)"
# Its own lockfile, resolved fresh as a user's would be; the build artefacts
# of this checkout are reused where they match.
cd "$outside/outside-app"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$checkout/target}"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test "$@"
