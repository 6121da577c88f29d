#!/usr/bin/env bash
# Build kwserver's OCI image from Debian packages and wheels, without pulling a base image:
#   1. mmdebstrap unpacks Python and its shared libraries (deploy/image-packages.txt) into a root tree;
#   2. pip installs kwserver's wheel and its locked dependencies (deploy/image-requirements.txt) into
#      the tree's dist-packages, wheels only (nothing is compiled); docs, tests and symbols are dropped
#      and the image's own Python compiles the bytecode;
#   3. with --policies, the policies.yml and its modules are baked in and the image's kwserver compiles
#      them into a read-only compiled-module cache, so a start with them compiles nothing;
#   4. buildah commits the tree as a one-layer image (uid 65532, entrypoint kwserver) and writes it as
#      an OCI archive too.
# Reproducible: SOURCE_DATE_EPOCH (default: the last commit's time) is the time of every file, of the
# image and of its labels; the package lists are fixed; the same inputs (the commit is one, through the
# revision label) give the same image digest.
# Needs root (tested; as another user it re-runs itself under `buildah unshare`, which needs subuid
# ranges: untested), mmdebstrap, buildah, python3 with pip, and the
# Debian mirror of this machine's apt sources. Prints the image's name, digest and sizes.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
usage() {
    cat <<EOF
usage: deploy/build-image.sh [options]
  --policies FILE    bake FILE in as /etc/kwserver/policies.yml (its local modules go into the image's
                     library, /opt/kwserver/policies/dist) and warm the compiled-module cache for it
  --tag NAME         image name (default: localhost/kwserver:<version>)
  --output DIR       where the OCI archive and the build record go (default: deploy/out)
  --storage DIR      buildah's storage root (default: buildah's own); --runroot is DIR/run
  --mirror URL       Debian mirror (default: the first of this machine's apt sources, else deb.debian.org)
  --security-mirror URL   Debian security mirror (default: likewise)
  --suite NAME       Debian suite (default: bookworm; Python 3.11)
  --revision TEXT    the org.opencontainers.image.revision label (default: the commit of this tree)
  --python PYTHON    the Python whose pip builds and fetches the wheels (default: python3)
  --update-lock      re-resolve the Python dependencies and rewrite deploy/image-requirements.txt
  --print-mirrors    print the Debian mirrors and suite the build would use, then exit
EOF
}

arguments=("$@")
policies="" tag="" output="$REPO/deploy/out" storage="" mirror="" security_mirror="" suite=bookworm
python=python3 update_lock=0 print_mirrors=0 revision=""
while [ $# -gt 0 ]; do
    case "$1" in
        --policies) policies=$(realpath "$2"); shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --output) output=$2; shift 2 ;;
        --storage) storage=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        --security-mirror) security_mirror=$2; shift 2 ;;
        --suite) suite=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --revision) revision=$2; shift 2 ;;
        --update-lock) update_lock=1; shift ;;
        --print-mirrors) print_mirrors=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

for tool in mmdebstrap buildah; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is not installed (apt-get install $tool)" >&2; exit 1; }
done

# The mirror apt on this machine already uses (deb822 or one-line sources).
apt_mirror() {  # $1: a pattern the URI must match, $2: a pattern it must not
    cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        sed -n -e 's/^URIs: *//p' -e 's/^deb  *\(\[[^]]*\] *\)\{0,1\}\([^ ]*\).*/\2/p' |
        grep -E "$1" | grep -vE "$2" | head -n 1 || true
}
mirror=${mirror:-$(apt_mirror '/debian/?$' 'security')}
mirror=${mirror:-http://deb.debian.org/debian}
security_mirror=${security_mirror:-$(apt_mirror 'debian-security/?$' '^$')}
security_mirror=${security_mirror:-http://deb.debian.org/debian-security}
if [ "$print_mirrors" = 1 ]; then
    echo "$mirror $suite"; echo "$security_mirror $suite-security"; exit 0
fi

if [ "$(id -u)" != 0 ]; then
    exec buildah unshare "$0" "${arguments[@]}"
fi

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct)}
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/kwserver/__init__.py")
revision=${revision:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}
tag=${tag:-localhost/kwserver:$version}
buildah=(buildah)
[ -n "$storage" ] && buildah+=(--root "$storage" --runroot "$storage/run" --storage-driver vfs)
mkdir -p "$output"
output=$(realpath "$output")

work=$(mktemp -d /tmp/kwserver-image.XXXXXX)
container=""
cleanup() {
    [ -n "$container" ] && "${buildah[@]}" rm "$container" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT
rootfs=$work/rootfs
site=$rootfs/usr/lib/python3/dist-packages
started=$(date +%s)

step() { echo "build-image: $* ($(( $(date +%s) - started ))s)" >&2; }

# 1. Debian: only unpacked, so no maintainer scripts, no dpkg database, no device nodes.
step "unpacking Debian $suite from $mirror"
packages=$(grep -v '^#' "$REPO/deploy/image-packages.txt" | paste -sd, -)
mmdebstrap --quiet --mode=root --variant=extract --include="$packages" \
    --extract-hook='find "$1/var/cache/apt/archives" -name "*.deb" -printf "%f\n" | sed "s/\.deb$//" | sort > "$1/.debs"' \
    "$suite" "$rootfs" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security_mirror $suite-security main"

# 2. kwserver and its dependencies, wheels for the image's Python and C library only.
step "installing kwserver's wheel and dependencies"
# From a copy: an in-tree build leaves build/ behind, whose stale files a later wheel would pick up.
mkdir -p "$work/source/policies"
cp -r "$REPO"/{pyproject.toml,setup.cfg,README.md,kwserver} "$work/source/"
cp -r "$REPO"/policies/{catalog.json,CATALOG.md,README.md,dist} "$work/source/policies/"
find "$work/source" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheel" "$work/source"
platforms=()
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
wheel_options=(--only-binary=:all: --no-compile --python-version 3.11 --implementation cp "${platforms[@]}")
lock=$REPO/deploy/image-requirements.txt
# With the `otel` extra: the controller turns on OTLP metrics and traces (--enable-metrics, --log-fmt otlp).
package="$(echo "$work"/wheel/*.whl)[otel]"
if [ "$update_lock" = 1 ]; then
    "$python" -m pip install --quiet --target "$work/resolve" "${wheel_options[@]}" "$package"
    { sed -n '1,/^[^#]/{/^#/p}' "$lock"
      "$python" -m pip list --path "$work/resolve" --format freeze | grep -v '^kwserver==' | LC_ALL=C sort -f; } > "$work/lock"
    mv "$work/lock" "$lock"
fi
"$python" -m pip install --quiet --target "$site" "${wheel_options[@]}" --constraint "$lock" "$package"
resolved=$("$python" -m pip list --path "$site" --format freeze | grep -v '^kwserver==' | LC_ALL=C sort -f)
if [ "$resolved" != "$(grep -v '^#' "$lock" | LC_ALL=C sort -f)" ]; then
    echo "build-image: the dependencies differ from deploy/image-requirements.txt; run with --update-lock:" >&2
    diff <(grep -v '^#' "$lock" | LC_ALL=C sort -f) <(echo "$resolved") >&2 || true
    exit 1
fi

# 3. The file system: what the image runs and nothing else.
step "trimming and laying out the file system"
rm -rf "$site/bin" "$site/share" "$site/falcon/bench" "$site/certifi/tests"
# Where the wheel was built (a temporary directory) is no part of the image.
rm "$site"/kwserver-*.dist-info/direct_url.json
sed -i '/direct_url.json/d' "$site"/kwserver-*.dist-info/RECORD
find "$site" \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pyi' -o -name '*.c' -o -name '*.h' \) -delete
# Wheels ship their extensions with symbols (uvloop's is 13 MB, 1.6 MB without); the dynamic ones stay.
if command -v strip >/dev/null; then
    find "$site" -name '*.so' -exec strip --strip-unneeded {} +
fi
rm -rf "$rootfs"/usr/share/{doc,man,info,locale,lintian,bug,bash-completion,binfmts,polkit-1,pixmaps,applications,perl5} \
    "$rootfs"/usr/lib/python3.11/{idlelib,lib2to3,pydoc_data,turtledemo,tkinter,ensurepip,test} \
    "$rootfs"/usr/bin/{pdb3.11,pydoc3.11,pygettext3.11,dpkg*,update-alternatives} "$rootfs"/usr/sbin/* \
    "$rootfs"/usr/lib/x86_64-linux-gnu/gconv "$rootfs"/{bin,sbin}/* "$rootfs"/usr/libexec "$rootfs"/var/lib/dpkg "$rootfs"/var/lib/apt \
    "$rootfs"/var/cache/* "$rootfs"/var/log/* "$rootfs"/etc/{dpkg,apt,alternatives,cron.daily,logrotate.d}
# The runtime makes /dev; the device nodes mmdebstrap made are no part of the image.
rm -rf "$rootfs/dev"
mkdir -p "$rootfs"/{proc,sys,dev,tmp,etc/kwserver,home/kwserver,opt/kwserver/policies,usr/share/kwserver}
chmod 1777 "$rootfs/tmp"
ln -sf python3.11 "$rootfs/usr/bin/python3"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nkwserver:x:65532:65532:kwserver:/home/kwserver:/usr/sbin/nologin\n' \
    > "$rootfs/etc/passwd"
printf 'root:x:0:\nkwserver:x:65532:\n' > "$rootfs/etc/group"
chown 65532:65532 "$rootfs/home/kwserver"
# -I: the image's Python ignores PYTHON* variables and the current directory.
printf '#!/usr/bin/python3 -I\nimport sys\n\nfrom kwserver.commands.cli import main\n\nsys.exit(main())\n' > "$rootfs/usr/bin/kwserver"
chmod 0755 "$rootfs/usr/bin/kwserver"
cp -r "$REPO/policies/dist" "$REPO/policies/catalog.json" "$REPO/policies/CATALOG.md" "$REPO/policies/README.md" \
    "$rootfs/opt/kwserver/policies/"
mv "$rootfs/.debs" "$rootfs/usr/share/kwserver/debian-packages.txt"
{ echo "kwserver==$version"; echo "$resolved"; } > "$rootfs/usr/share/kwserver/python-packages.txt"

# 4. Bytecode, by the image's own Python; unchecked hashes: the sources never change under it.
step "compiling bytecode"
chroot "$rootfs" /usr/bin/python3 -m compileall -q -j1 --invalidation-mode unchecked-hash \
    /usr/lib/python3.11 /usr/lib/python3/dist-packages >/dev/null

# 5. Baked policies: local modules into the library, then the cache warmed by `kwserver check`.
if [ -n "$policies" ]; then
    step "baking $policies in and compiling its modules"
    PYTHONPATH=$site "$python" - "$policies" "$rootfs" <<'EOF'
import shutil
import sys
from pathlib import Path

from kwserver.commands.manifests import IMAGE_MODULE_DIR, config_map_policies
from kwserver.sources.references import LocalReference, parse_reference
import yaml

policies, rootfs = Path(sys.argv[1]), Path(sys.argv[2])
text = policies.read_text()


def local_modules(entry):
    if isinstance(entry.get("module"), str):
        reference = parse_reference(entry["module"], policies.parent)
        if isinstance(reference, LocalReference):
            yield Path(reference.path)
    for member in (entry.get("policies") or {}).values():
        if isinstance(member, dict):
            yield from local_modules(member)


library = rootfs / IMAGE_MODULE_DIR.lstrip("/")
for entry in (yaml.safe_load(text) or {}).values():
    for module in local_modules(entry) if isinstance(entry, dict) else ():
        shutil.copyfile(module, library / module.name)
(rootfs / "etc/kwserver/policies.yml").write_text(config_map_policies(text, policies.parent, IMAGE_MODULE_DIR))
EOF
    # As at run time but as root: the cache is root's and read-only to the server (it reads it, and
    # writes what is missing to /tmp/kwserver-cache).
    env -i PATH=/usr/bin HOME=/root XDG_CACHE_HOME=/var/cache KUBEWARDEN_POLICIES_DOWNLOAD_DIR=/tmp/warm \
        "$(command -v chroot)" "$rootfs" /usr/bin/kwserver check --policies /etc/kwserver/policies.yml
    rm -rf "$rootfs/tmp/warm" "$rootfs/root"
    chmod -R go-w,a+rX "$rootfs/var/cache/kwserver"
    chmod 0755 "$rootfs/var/cache/kwserver"
fi

# 6. One layer, every file dated SOURCE_DATE_EPOCH.
step "committing the image"
find "$rootfs" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
tar --create --file "$work/rootfs.tar" --directory "$rootfs" --sort=name --numeric-owner \
    --mtime="@$SOURCE_DATE_EPOCH" --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime .
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
environment=(HOME=/home/kwserver XDG_CACHE_HOME=/var/cache KUBEWARDEN_POLICIES_DOWNLOAD_DIR=/tmp
             PATH=/usr/bin)
if [ -n "$policies" ]; then environment+=(KUBEWARDEN_POLICIES=/etc/kwserver/policies.yml)
else environment+=(KUBEWARDEN_POLICIES=/config/policies.yml); fi
container=$("${buildah[@]}" from --quiet scratch)
"${buildah[@]}" add --quiet "$container" "$work/rootfs.tar" /
config=(--entrypoint '["/usr/bin/kwserver"]' --cmd serve --user 65532:65532 --workingdir /home/kwserver
        --port 3000/tcp --port 8081/tcp --os linux --arch amd64
        --label org.opencontainers.image.title=kwserver
        --label "org.opencontainers.image.description=Kubewarden-compatible admission policy server"
        --label org.opencontainers.image.licenses=Apache-2.0
        --label "org.opencontainers.image.version=$version"
        --label "org.opencontainers.image.revision=$revision"
        --label "org.opencontainers.image.created=$created"
        --label "io.kwserver.policies-baked=$([ -n "$policies" ] && echo true || echo false)")
for variable in "${environment[@]}"; do config+=(--env "$variable"); done
"${buildah[@]}" config "${config[@]}" "$container"
"${buildah[@]}" commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" --rm "$container" "$tag" >/dev/null
container=""
archive=$output/kwserver-$version.oci.tar
rm -f "$archive"
"${buildah[@]}" push --quiet "$tag" "oci-archive:$archive:$tag"

# The record: digest and sizes (uncompressed: the layer; compressed: the archive's gzip layer).
digest=$("${buildah[@]}" inspect --type image --format '{{.FromImageDigest}}' "$tag")
uncompressed=$(stat -c %s "$work/rootfs.tar")
compressed=$(tar -tvf "$archive" | awk '$6 ~ /^blobs\/sha256\// {print $3}' | sort -n | tail -n 1)
elapsed=$(( $(date +%s) - started ))
cat > "$output/build.env" <<EOF
IMAGE=$tag
DIGEST=$digest
ARCHIVE=$archive
UNCOMPRESSED_BYTES=$uncompressed
COMPRESSED_BYTES=$compressed
POLICIES_BAKED=$([ -n "$policies" ] && echo true || echo false)
BUILD_SECONDS=$elapsed
EOF
cat "$output/build.env"
