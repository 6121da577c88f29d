#!/bin/sh
# Rebuilds kwserver's policy library: every policy of this workspace is
# compiled, annotated with its Kubewarden metadata (<name>/metadata.yml) and
# written to dist/<name>.wasm; then catalog.json and CATALOG.md are
# regenerated from the modules.
#
#   policies/build.sh            # build + annotate + catalog
#   policies/build.sh --check    # same, into a scratch directory, then fail
#                                # if anything differs from what is committed
#
# Offline and reproducible (same bytes on every rerun and in every checkout):
# Debian's rustc 1.63 and vendored crates only (.cargo/config.toml),
# Cargo.lock enforced, a private CARGO_HOME so that no user-level cargo
# config leaks in, and the checkout path remapped. The policies depend on
# kwguest through the symlink ./kwguest -> ../guest/kwguest: Cargo hashes
# the path of a path dependency into symbol names relative to the workspace
# root when it lies inside it, but absolute when it does not, which would
# make the bytes depend on where the repository lives.
# Environment: PYTHON (default /work/venv/bin/python, else python3),
# CARGO_TARGET_DIR (default policies/target).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/target}

out_dir=$here
case "${1:-}" in
    --check) out_dir=$(mktemp -d) ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if [ -z "${PYTHON:-}" ]; then
    if [ -x /work/venv/bin/python ]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi
if ! (cd "$repo" && "$PYTHON" -m kwserver annotate --help >/dev/null 2>&1); then
    echo "error: '$PYTHON -m kwserver annotate' is not available (install kwserver first)" >&2
    exit 1
fi

# Every member of the workspace, in Cargo.toml order. None needs WASI: they
# import nothing but the waPC host functions.
policies=$(sed -n '/^members = \[/,/^\]/p' "$here/Cargo.toml" | sed -n 's/^ *"\([a-z0-9-]*\)",*$/\1/p')
rust_target=wasm32-unknown-unknown

packages=$(for name in $policies; do printf ' -p %s' "$name"; done)
# A rustup toolchain may be first on PATH: force Debian's binaries.
# shellcheck disable=SC2086 # word splitting of $packages is intended
(cd "$here" && env PATH=/usr/bin:/bin RUSTC=/usr/bin/rustc \
    CARGO_HOME="$target_dir/cargo-home" CARGO_TARGET_DIR="$target_dir" \
    RUSTFLAGS="--remap-path-prefix=$repo=/kwserver" \
    /usr/bin/cargo build --release --locked --target "$rust_target" $packages)

mkdir -p "$out_dir/dist"
for name in $policies; do
    built="$target_dir/$rust_target/release/$(echo "$name" | tr - _).wasm"
    out="$out_dir/dist/$name.wasm"
    (cd "$repo" && "$PYTHON" -m kwserver annotate "$built" --metadata "$here/$name/metadata.yml" -o "$out")
    chmod 644 "$out"  # cargo's output is executable; a committed module should not be
done

(cd "$repo" && "$PYTHON" "$here/catalog.py" --policies-dir "$here" --dist "$out_dir/dist" \
    --json "$out_dir/catalog.json" --markdown "$out_dir/CATALOG.md" $policies)

if [ "$out_dir" != "$here" ]; then
    status=0
    for file in catalog.json CATALOG.md $(for name in $policies; do echo "dist/$name.wasm"; done); do
        if ! cmp -s "$out_dir/$file" "$here/$file"; then
            echo "differs from the committed copy: policies/$file" >&2
            status=1
        fi
    done
    rm -rf "$out_dir"
    [ "$status" = 0 ] && echo "policies/: rebuilt modules and catalog are identical to the committed ones"
    exit "$status"
fi
cat "$here/CATALOG.md" | sed -n '/^| name/,/^$/p'
