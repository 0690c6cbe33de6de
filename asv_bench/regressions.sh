#!/usr/bin/env bash
# Catch a slowdown between two commits on a small, fast subset of the benchmarks.
#
#   asv_bench/regressions.sh [BASE [HEAD]]        (defaults: main, HEAD)
#
# What `asv continuous --python=same --factor 1.1 BASE HEAD` would do, in an
# existing environment: asv 0.6 refuses a commit range there ("No range spec may
# be specified if benchmarking in an existing environment") because it cannot
# build another commit into the interpreter it runs in. So, for each of the two
# commits, this script checks the commit out into a temporary git worktree, puts
# that worktree first on the benchmark processes' sys.path (ASV_PYTHONPATH: asv
# drops plain PYTHONPATH entries; curvcore is then imported from the worktree,
# before the editable install of this checkout, and the suite checks that it
# was, see CURVCORE_BENCH_SOURCE in asv_bench/common.py), runs the subset with
# `asv run --python=same --set-commit-hash <commit>`, and finally prints
# `asv compare --factor $FACTOR --split --only-changed BASE HEAD`.
# The benchmark code is this checkout's asv_bench/ for both commits, as with
# `asv continuous`. Exit status 1 when a benchmark got slower by more than FACTOR.
#
# Environment: FACTOR (default 1.1), BENCH (asv -b regex of the subset),
# CURVCORE_BENCH_GRID (default cpu: the grid level that lists the subset),
# MACHINE (the asv machine name, default: the host name; asv compare needs one
# when results of several machines are stored),
# PYTHON (default python3), ASV (the asv command, default: $PYTHON -m asv, so that
# asv runs in that interpreter whatever the shebang of an `asv` script says),
# ASV_ARGS (extra arguments to asv run, default: -a repeat=7 -a number=0).
set -euo pipefail

BASE=${1:-main}
HEAD=${2:-HEAD}
FACTOR=${FACTOR:-1.1}
# The fast subset: full steps on the small net (digits-sized batch) on NumPy and
# torch, for SGD, Adam and CurveBall, plus the curvcore GGN-vector product.
BENCH=${BENCH:-"^bench_step\.Step\.time_step\('(numpy|torch:cpu)\|(sgd|adam|curveball)\|small\|64'\)|^bench_products\.GGNOverhead\.time_ggn_curvcore\('torch:cpu\|small\|64'\)"}
ASV_ARGS=${ASV_ARGS:-"-a repeat=7 -a number=0"}
export CURVCORE_BENCH_GRID=${CURVCORE_BENCH_GRID:-cpu}  # the subset is not all in the quick grid
PYTHON=${PYTHON:-python3}
ASV=${ASV:-"$PYTHON -m asv"}
MACHINE=${MACHINE:-$("$PYTHON" -c 'import platform; print(platform.node())')}

ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
base_hash=$(git rev-parse "$BASE")
head_hash=$(git rev-parse "$HEAD")
tmp=$(mktemp -d)
cleanup() {
    for h in "$base_hash" "$head_hash"; do
        git worktree remove --force "$tmp/$h" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

$ASV machine --yes --machine "$MACHINE" >/dev/null
for h in "$base_hash" "$head_hash"; do
    [ -d "$tmp/$h" ] && continue
    git worktree add --detach --quiet "$tmp/$h" "$h"
    # curvcore.backends lives in backends/ (mapped by pyproject's package-dir); mirror that mapping.
    [ -e "$tmp/$h/curvcore/backends" ] || ln -s ../backends "$tmp/$h/curvcore/backends"
    echo "== benchmarking $(git log -1 --format='%h %s' "$h")"
    ASV_PYTHONPATH="$tmp/$h" CURVCORE_BENCH_SOURCE="$tmp/$h" \
        $ASV run --python=same --machine "$MACHINE" --set-commit-hash "$h" --bench "$BENCH" $ASV_ARGS --show-stderr
done

echo "== asv compare --factor $FACTOR --split --only-changed $BASE $HEAD"
out=$($ASV compare --machine "$MACHINE" --factor "$FACTOR" --split --only-changed "$base_hash" "$head_hash")
echo "$out"
if echo "$out" | grep -qE '^\| *\+ *\|'; then
    echo "SLOWDOWN: at least one benchmark is more than ${FACTOR}x slower on $HEAD than on $BASE."
    exit 1
fi
echo "No benchmark of the subset is more than ${FACTOR}x slower."
