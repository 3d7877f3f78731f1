#!/usr/bin/env bash
# One-shot GPU check (issue 15): versions, Triton kernels vs their references, CPU vs CUDA
# trainer, events/s, `memstream eval` on CUDA beside the CPU. Under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine (benchmarks/README.md)
#   bash benchmarks/gpu_check.sh --device cpu --smoke   # anywhere: every section at tiny shapes
#
# The GPU machine has only torch and triton: the project's other packages come from .whl/
# and the ML-1M prefix from .gpu_data/, both written here by benchmarks/gpu_wheels.sh and
# carried. Each section runs in its own process under its own hard time limit (a hung
# kernel or a slow section cannot eat the others' time); the tables go to stdout and to
# $OUT/gpu_check.md when $OUT is set, else benchmarks/results/gpu_<device>.md (a smoke run:
# the temp dir). The whole log goes to $OUT/gpu_check.log too. Exit 1 if a section failed.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--smoke] [--only kernels,parity,...]" \
        "[--out FILE.md] [--recording F]"
}
device=cuda
opts=()
out=
only=
while (($#)); do
    case $1 in
        --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
        --smoke) opts+=(--smoke); shift ;;
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --only) only=${2:?--only needs sections, e.g. kernels,eval}; shift 2 ;;
        --recording) opts+=(--recording "${2:?--recording needs a file}"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case $device in cuda | cpu) ;; *) echo "gpu_check.sh: --device is cuda or cpu, not '$device'" >&2; exit 2 ;; esac
smoke=0
[[ " ${opts[*]-} " == *" --smoke "* ]] && smoke=1

# Hard limits per section, seconds (sum + install < 480: the issue's 8 minutes). Each section
# also gets its limit as --budget-s and stops starting new work a margin before it.
if ((smoke)); then
    budgets=(versions:40 kernels:60 parity:60 throughput:60 eval:90)
else
    budgets=(versions:30 kernels:110 parity:55 throughput:115 eval:150)
fi
# --only: rerun some sections (the versions always come first).
if [[ -n $only ]]; then
    for name in ${only//,/ }; do
        [[ " ${budgets[*]} " == *" $name:"* ]] || { echo "gpu_check.sh: --only: no section '$name'" >&2; exit 2; }
    done
    kept=()
    for entry in "${budgets[@]}"; do
        [[ ${entry%%:*} == versions || ",$only," == *",${entry%%:*},"* ]] && kept+=("$entry")
    done
    budgets=("${kept[@]}")
fi

# This repo's venv where there is one (here), else the image's python3 (the GPU machine).
py=${GPU_CHECK_PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
if [[ -n ${OUT:-} ]]; then
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

# The project's packages that the image lacks: from the carried wheels, into /tmp/site (not
# into this repo's .venv, a python 3.11 here: the wheels are the GPU image's cp312).
if [[ $py != .venv/bin/python ]] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$py" -c 'import pydantic, fastapi, yaml, pyarrow, safetensors' 2>/dev/null; then
    echo "gpu_check.sh: $py lacks the project's packages: run 'bash benchmarks/gpu_wheels.sh' where" \
        "pip works and carry .whl and .gpu_data (benchmarks/README.md)" >&2
    exit 2
fi

if [[ -z $out ]]; then
    out=$("$py" benchmarks/gpu_check.py out-path --device "$device" "${opts[@]}")
fi
mkdir -p "$(dirname "$out")"
: >"$out" # a fresh table per run
echo "tables: $out"

# The hard limit needs coreutils' timeout; without it the sections' own budgets still hold.
limit=(timeout --kill-after=10)
command -v timeout >/dev/null || { echo "gpu_check.sh: no 'timeout' here: soft budgets only" >&2; limit=(); }
failed=()
started=$SECONDS
for entry in "${budgets[@]}"; do
    name=${entry%%:*} budget=${entry##*:}
    echo "== $name (limit ${budget} s)"
    rc=0
    ${limit[@]+"${limit[@]}"} ${limit[@]+"$budget"} "$py" benchmarks/gpu_check.py "$name" --device "$device" \
        "${opts[@]}" --out "$out" --budget-s "$budget" || rc=$?
    if ((rc == 124 || rc == 137)); then
        printf '\n**%s: stopped at its %s s limit**: its table is missing or partial.\n\n' "$name" "$budget" |
            tee -a "$out"
        failed+=("$name")
    elif ((rc != 0)); then
        printf '\n**%s: failed (exit %s)**: see the log.\n\n' "$name" "$rc" | tee -a "$out"
        failed+=("$name")
    fi
    if [[ $name == versions && $rc != 0 ]]; then
        echo "gpu_check.sh: the versions section failed (imports?); the other sections need it" >&2
        break
    fi
done
printf 'Whole check: %s s%s.\n' "$((SECONDS - started))" \
    "${failed[*]:+; sections that did not finish: ${failed[*]}}" | tee -a "$out"
echo "tables: $out"
((${#failed[@]} == 0))
