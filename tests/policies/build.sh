#!/bin/sh
# Rebuilds kwserver's test policies and annotates them with their
# Kubewarden metadata, producing tests/policies/<name>.wasm.
#
#   tests/policies/build.sh                # build + annotate
#   tests/policies/build.sh --no-annotate  # build only, copy unannotated modules
#
# Offline and reproducible: Debian's rustc 1.63 and vendored crates only
# (see .cargo/config.toml), Cargo.lock enforced, a private CARGO_HOME so that
# no user-level cargo config leaks in, and the checkout path remapped so the
# bytes do not depend on where the repository lives. The policies depend on
# kwguest through the symlink ./kwguest -> ../../guest/kwguest: Cargo hashes
# the path of a path dependency into symbol names (hence into code layout)
# relative to the workspace root when it lies inside it, but absolute when it
# does not, which would make the bytes depend on the checkout location.
# Environment: PYTHON (default /work/venv/bin/python, else python3),
# CARGO_TARGET_DIR (default tests/policies/target).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/target}

annotate=1
case "${1:-}" in
    --no-annotate) annotate=0 ;;
    "") ;;
    *) echo "usage: $0 [--no-annotate]" >&2; exit 2 ;;
esac

if [ -z "${PYTHON:-}" ]; then
    if [ -x /work/venv/bin/python ]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi

# policy name, rust target. `sleeping` needs WASI (it reads the clock) and
# `wasi-testbed` is a WASI command; the others import nothing but waPC.
policies="opa-ingress-hosts:wasm32-unknown-unknown
pod-privileged:wasm32-unknown-unknown
raw-mutation:wasm32-unknown-unknown
raw-validation:wasm32-unknown-unknown
sleeping:wasm32-wasi
wasi-testbed:wasm32-wasi"

cargo_build() {
    # $1 = rust target, rest = cargo args. A rustup toolchain may be first on
    # PATH: force Debian's binaries.
    rust_target=$1
    shift
    (cd "$here" && env PATH=/usr/bin:/bin RUSTC=/usr/bin/rustc \
        CARGO_HOME="$target_dir/cargo-home" CARGO_TARGET_DIR="$target_dir" \
        RUSTFLAGS="--remap-path-prefix=$repo=/kwserver" \
        /usr/bin/cargo build --release --locked --target "$rust_target" "$@")
}

for rust_target in wasm32-unknown-unknown wasm32-wasi; do
    packages=$(echo "$policies" | awk -F: -v t="$rust_target" '$2 == t { printf " -p %s", $1 }')
    [ -n "$packages" ] || continue
    # shellcheck disable=SC2086 # word splitting of $packages is intended
    cargo_build "$rust_target" $packages
done

if [ "$annotate" = 1 ] && ! (cd "$repo" && "$PYTHON" -m kwserver annotate --help >/dev/null 2>&1); then
    echo "error: '$PYTHON -m kwserver annotate' is not available; rerun with --no-annotate" >&2
    exit 1
fi

for entry in $policies; do
    name=${entry%%:*}
    rust_target=${entry#*:}
    built="$target_dir/$rust_target/release/$(echo "$name" | tr - _).wasm"
    out="$here/$name.wasm"
    if [ "$annotate" = 1 ]; then
        (cd "$repo" && "$PYTHON" -m kwserver annotate "$built" --metadata "$here/$name/metadata.yml" -o "$out")
    else
        cp "$built" "$out"
    fi
    chmod 644 "$out"  # cargo's output is executable; a committed module should not be
    echo "$out: $(wc -c < "$out") bytes"
done
