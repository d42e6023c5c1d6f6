#!/usr/bin/env bash
# Kernel launches per GPU training step, by kernel, without a GPU: the `train` stage's model
# at `narrow` widths (train_bench, batch 4, source 16, target 16, vocab 512, `mini`'s layers
# and operations) on burn's wgpu backend over Mesa's software Vulkan device (lavapipe),
# with CubeCL's profile log. The same burn-autodiff, burn-fusion and CubeCL code decides
# the launches as on CUDA, so the count is what a GPU step's host pays for, launch by
# launch. Two runs (SHORT and LONG timed steps) cancel the set-up and warm-up launches:
# per step = difference / (LONG - SHORT) (bench/kernel_time.py, which also sums
# lavapipe's time per kernel: a CPU's, not a GPU's). Writes bench/results/launches.md.
#
#   bash bench/launches.sh           # needs mesa-vulkan-drivers (lavapipe); ~15 min to build
#   bash bench/launches.sh --no-fusion   # burn-fusion off: bench/results/launches-no-fusion.md
#   bash bench/launches.sh --burn-steps  # layer norm, softmax, dropout, loss as burn composes:
#                                        # bench/results/launches-burn-steps.md
#   bash bench/launches.sh --burn-cat    # FlatAdamW's vectors laid end to end by burn's cat,
#                                        # a kernel per piece: launches-burn-cat.md
#   bash bench/launches.sh --f16         # mixed precision (f16: lavapipe has no bf16), the
#                                        # parameters cast at once by FlatAdamW
#   bash bench/launches.sh --f16 --cast-each  # ... each cast by autodiff
set -euo pipefail
cd "$(dirname "$0")/.."
compgen -G "/usr/share/vulkan/icd.d/lvp_icd.*.json" >/dev/null || {
    echo "no lavapipe: apt-get install mesa-vulkan-drivers" >&2
    exit 1
}
cargo build --release --locked -q -p orchestrate-model --features wgpu --example train_bench
short=2 long=6
# Each flag is train_bench's and names the results file: launches-f16-cast-each.md.
variant="$*"
results=bench/results/launches
for flag in "$@"; do
    case "$flag" in
    --no-fusion | --burn-steps | --burn-cat | --f16 | --cast-each) results+="-${flag#--}" ;;
    *)
        echo "usage: bash bench/launches.sh [--no-fusion] [--burn-steps] [--burn-cat] [--f16 [--cast-each]]" >&2
        exit 2
        ;;
    esac
done
results+=.md
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# Mesa's Vulkan loader complains on every start without one (a machine with no login session).
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$logs}
for steps in $short $long; do
    echo "narrow, $steps steps on wgpu (lavapipe) $variant" >&2
    CUBECL_DEBUG_LOG="$logs/$steps.log" CUBECL_DEBUG_OPTION=profile \
        target/release/examples/train_bench narrow "$steps" --device wgpu $variant > /dev/null
done
mkdir -p bench/results
python3 bench/kernel_time.py "$logs/$short.log" "$logs/$long.log" $short $long \
    "Kernel launches per \`narrow\` training step${variant:+ ($variant)} on burn's wgpu backend (lavapipe), $(date +%F), commit $(git rev-parse --short HEAD)" |
    tee "$results"
