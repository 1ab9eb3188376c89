#!/usr/bin/env bash
# Records the AOT reports of benchmarks/results/aot/README.md (run from the repo root with
# the venv active). One process at a time: each 1B compile takes ~4 min on 2 CPU cores.
set -u
OUT=benchmarks/results/aot
export JAX_PLATFORMS=cpu
run() {  # name, flags...
  local name=$1; shift
  echo "\$ python -m experiments.aot $*" > "$OUT/$name.txt"
  # libtpu's start-up warnings (no TPU attached) are filtered out of the log.
  { time python -m experiments.aot "$@" --json_out="$OUT/$name.json"; } > "$OUT/.log" 2>&1
  grep -v "WARNING\|E0000\|Source Location\|libtpu_init\|^===" "$OUT/.log" >> "$OUT/$name.txt"
  rm -f "$OUT/.log"
}
# 1. Per-device state bytes of every method, every topology and mesh (shardings only).
for topo in 4x4 8x8 16x16; do
  for t in 1 4; do
    run "state_v5e_${topo}_tensor${t}" --topology=v5e:$topo --tensor=$t --nocompile
  done
done
# 2. Compiled: all four methods on 256 chips, both meshes.
for t in 1 4; do
  run "compiled_v5e_16x16_tensor${t}" --topology=v5e:16x16 --tensor=$t
done
# 3. Compiled, the extremes only (finetune, gpm), on 16 and 64 chips.
for topo in 4x4 8x8; do
  for t in 1 4; do
    run "compiled_v5e_${topo}_tensor${t}" --topology=v5e:$topo --tensor=$t \
      --methods=finetune,gpm
  done
done
