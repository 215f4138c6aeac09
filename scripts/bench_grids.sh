#!/usr/bin/env bash
# The VTAB-mini grids behind docs/results.md, within a wall-time budget, in this order:
#   main    tasks x {linear, full, vpt/spt shallow/deep} x both zoo backbones, seed 0
#   inits   spt-deep x {kmeans, mean_pool, max_pool, sample, xavier} x both backbones, seed 0
#   length  {vpt,spt}-deep x M in {1, 5, 10, 20, 50}, MAE backbone, seed 0
#   main    again with seeds 1 and 2
# Finished cells are never rerun, so running it again (here or on another machine) goes on where it stopped.
# Usage: scripts/bench_grids.sh VTAB_MINI_ROOT OUT_DIR MINUTES [extra selfprompt-bench arguments...]
set -uo pipefail
root=$1
out=$2
minutes=$3
shift 3
start=$(date +%s)
left() { python3 -c "print(max(0.0, $minutes - ($(date +%s) - $start) / 60))"; }
bench() { python3 -m selfprompt bench --root "$root" "$@" --stop_after_minutes "$(left)"; }
bench --output_dir "$out/main" --seeds '[0]' "$@"
bench --output_dir "$out/inits" --methods '[spt-deep]' --inits '[kmeans,mean_pool,max_pool,sample,xavier]' \
    --seeds '[0]' "$@"
bench --output_dir "$out/length" --methods '[vpt-deep,spt-deep]' --backbones '[vit_mini_patch4_32.mae_fmnist]' \
    --num_prompts '[1,5,10,20,50]' --seeds '[0]' "$@"
bench --output_dir "$out/main" --seeds '[0,1,2]' "$@"
