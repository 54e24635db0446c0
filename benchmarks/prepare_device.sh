#!/usr/bin/env bash
# Builds DIR, everything a GPU-machine call of benchmarks/device_check.sh carries beside the working tree:
#   DIR/wheels/           the project's dependencies that the device image lacks, for its Python 3.12 (x86-64)
#   DIR/shared/data/...   the part of ../shared that tests/test_device.py reads (the call does not take ../shared)
#   DIR/MANIFEST.sha256   sha256 of every file above (check with: cd DIR && sha256sum -c MANIFEST.sha256)
# then checks that the working tree plus DIR stay under the call's size limit, and prints the call to make.
#
#   bash benchmarks/prepare_device.sh .device                 # DIR inside the repository must be git-ignored
#   bash benchmarks/prepare_device.sh DIR --dry-run           # all but the download (the test suite's run)
#
# Options: --dry-run (no network: DIR/wheels stays empty), --limit-mib N (default 60: the call takes 64 MiB,
# minus a margin). Exit status: 0, 1 when over the limit or a download fails, 2 for bad usage.
set -euo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
dir=$1
shift
dry="" limit_mib=60
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry=1; shift ;;
        --limit-mib) [ $# -ge 2 ] || usage; limit_mib=$2; shift 2 ;;
        *) echo "error: unknown option $1" >&2; usage ;;
    esac
done
[[ $limit_mib =~ ^[0-9]+$ ]] || { echo "error: --limit-mib takes whole MiB, not '$limit_mib'" >&2; exit 2; }

# pyproject.toml's dependencies missing from the device image (KINDS.md lists what it has), pinned to the
# versions the development venv resolves; what they require themselves (numpy, timm, torch, torchvision,
# huggingface-hub, pillow, safetensors, tqdm) is in the image.
WHEELS=(segmentation-models-pytorch==0.6.0 pycocotools==2.0.11)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
# tests/test_device.py reads the first 8 images of the first two (sorted) Imagenette val classes (real_batch) and
# the first two VOC images (_voc_image).
IMAGENETTE_CLASSES=2 IMAGENETTE_PER_CLASS=8 VOC_IMAGES=2

repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${FCAFORMER_SHARED:-$repo/../shared}
[ -d "$shared/data" ] || { echo "error: no shared data at $shared/data (set FCAFORMER_SHARED)" >&2; exit 2; }
dir=$(realpath -m "$dir")
carry=""
case $dir/ in
    "$repo"/*)
        carry=${dir#"$repo"/}
        if ! git -C "$repo" check-ignore -q "$carry/"; then
            echo "error: $carry is inside the repository but not git-ignored: use .device or add it to .gitignore" >&2
            exit 2
        fi ;;
esac

rm -rf "$dir/wheels" "$dir/shared" "$dir/MANIFEST.sha256"  # a rebuild starts clean
mkdir -p "$dir/wheels"
if [ -z "$dry" ]; then
    platform_args=()
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d "$dir/wheels" "${WHEELS[@]}" || { echo "error: wheel download failed" >&2; exit 1; }
fi

# The first N entries of a folder in byte order, which is Python's sorted() order for these ASCII names.
first() { find "$1" -mindepth 1 -maxdepth 1 -printf '%f\n' | LC_ALL=C sort | head -n "$2"; }
val=data/imagenette-160/val
for class in $(first "$shared/$val" "$IMAGENETTE_CLASSES"); do
    mkdir -p "$dir/shared/$val/$class"
    for image in $(first "$shared/$val/$class" "$IMAGENETTE_PER_CLASS"); do
        cp "$shared/$val/$class/$image" "$dir/shared/$val/$class/"
    done
done
voc=data/voc-mini/JPEGImages
mkdir -p "$dir/shared/$voc"
for image in $(first "$shared/$voc" "$VOC_IMAGES"); do cp "$shared/$voc/$image" "$dir/shared/$voc/"; done

(cd "$dir" && find wheels shared -type f | LC_ALL=C sort | xargs -d '\n' sha256sum > MANIFEST.sha256)

# What the call sends: tracked and untracked-but-not-ignored files, plus DIR.
tree_b=$(git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | (cd "$repo" && du -cb --files0-from=- 2>/dev/null || true) | tail -n 1 | cut -f 1)
wheels_b=$(du -sb "$dir/wheels" | cut -f 1)
shared_b=$(du -sb "$dir/shared" | cut -f 1)
total_b=$((tree_b + $(du -sb "$dir" | cut -f 1)))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "size: working tree $(mib "$tree_b"), wheels $(mib "$wheels_b")${dry:+ (dry run: none fetched)}," \
     "shared subset $(mib "$shared_b"), total $(mib "$total_b") of $limit_mib MiB allowed"
if [ "$total_b" -gt $((limit_mib * 1048576)) ]; then
    echo "error: the call would carry $(mib "$total_b"), over $limit_mib MiB: drop large untracked files or wheels" >&2
    exit 1
fi
echo "manifest: $dir/MANIFEST.sha256 ($(wc -l < "$dir/MANIFEST.sha256") files)"
if [ -z "$carry" ]; then
    echo "note: $dir is outside the repository, so a device call cannot carry it; use a git-ignored folder in it"
    carry=$dir
fi
echo "device command (carry: [\"$carry\"]):"
echo "  bash benchmarks/device_check.sh \"\$OUT\" --wheels $carry/wheels --shared $carry/shared --budget-s 500"
