#!/usr/bin/env bash
# The grid behind docs/results.md's "APT, IPT, BPT and VIPAMIN against VPT and SPT" (issue 28), on 2 CPU
# cores with one thread per cell. Each method searches the learning rates of its own default grid
# (`selfprompt.methods`: the `optim.lr` values of `bench --search default`) on val with the first seed; later
# seeds train the rate that search chose (`--search_seeds first`). Weight decay stays each recipe's.
#   MAE zoo backbone: vpt-deep, spt-deep, apt, ipt (relevance form), bpt (shallow) and spt-deep with VIPAMIN's
#     initialisation, on mnist, dsprites_location and clevr_distance, seeds 0-2.
#   supervised zoo backbone: the same without VIPAMIN (an initialisation for self-supervised backbones), seed 0
#     only (the session's CPU time; SUP_SEEDS='[0,1,2]' runs the rest).
# Finished cells are never rerun: running it again goes on where it stopped.
# Usage: scripts/bench_prompt_successors.sh VTAB_MINI_ROOT OUT_DIR [extra selfprompt-bench arguments...]
set -euo pipefail
root=$1
out=$2
shift 2
prompt='{"optim.lr": [5e-2, 1e-2, 5e-3, 1e-3]}'
lrs='{"vpt-deep": '$prompt', "spt-deep": '$prompt', "ipt": '$prompt',
  "apt": {"optim.lr": [5e-3, 1e-3, 5e-4, 1e-4]}, "bpt": {"optim.lr": [1e-1, 5e-2, 1e-2, 5e-3]}}'
common=(--root "$root" --tasks '[mnist,dsprites_location,clevr_distance]' --search_seeds first --device cpu
    --workers 2 --threads 1)
bench() { python3 -m selfprompt bench "${common[@]}" "$@"; }
mae='[vit_mini_patch4_32.mae_fmnist]'
bench --backbones "$mae" --seeds '[0,1,2]' --output_dir "$out/successors" --methods '[vpt-deep,spt-deep,apt,ipt,bpt]' \
    --search "$lrs" "$@"
bench --backbones "$mae" --seeds '[0,1,2]' --output_dir "$out/successors_vipamin" --methods '[spt-deep]' \
    --inits '[vipamin]' --search "$prompt" "$@"
bench --backbones '[vit_mini_patch4_32.sup_fmnist]' --seeds "${SUP_SEEDS:-[0]}" --output_dir "$out/successors_sup" \
    --methods '[vpt-deep,spt-deep,apt,ipt,bpt]' --search "$lrs" "$@"
