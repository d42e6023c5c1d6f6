#!/usr/bin/env bash
# The floor under a cached decoding step at batch 1: reading `mini`'s decoder and projection
# weights (22 MB per token) with plain vector-matrix products, on one core and on two.
#   bash bench/weight_reads.sh
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .cache
rustc -O -C target-cpu=native weight_reads.rs -o .cache/weight_reads
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
.cache/weight_reads
