#!/usr/bin/env bash
# The grid behind docs/results.md's "APT, IPT, BPT and VIPAMIN against VPT and SPT" (issue 28): vpt-deep,
# spt-deep, apt, ipt (relevance form), bpt (shallow) and spt-deep with VIPAMIN's initialisation, on both zoo
# backbones, three tasks and seeds 0-2 (2 CPU cores, one thread per cell). Each method searches the learning
# rates of its own default grid (`selfprompt.methods`, the `optim.lr` values of `bench --search default`) on
# val with seed 0; seeds 1 and 2 train the rate seed 0 chose (`--search_seeds first`). Weight decay stays each
# recipe's. Finished cells are never rerun: running it again goes on where it stopped.
# Usage: scripts/bench_prompt_successors.sh VTAB_MINI_ROOT OUT_DIR [extra selfprompt-bench arguments...]
set -euo pipefail
root=$1
out=$2
shift 2
prompt='{"optim.lr": [5e-2, 1e-2, 5e-3, 1e-3]}'
lrs='{"vpt-deep": '$prompt', "spt-deep": '$prompt', "ipt": '$prompt',
  "apt": {"optim.lr": [5e-3, 1e-3, 5e-4, 1e-4]}, "bpt": {"optim.lr": [1e-1, 5e-2, 1e-2, 5e-3]}}'
three='[mnist,dsprites_location,clevr_distance]'
for backbone in vit_mini_patch4_32.mae_fmnist vit_mini_patch4_32.sup_fmnist; do
    common=(--root "$root" --backbones "[$backbone]" --tasks "$three" --seeds '[0,1,2]' --search_seeds first
        --device cpu --workers 2 --threads 1 "$@")
    python3 -m selfprompt bench "${common[@]}" --output_dir "$out/successors" \
        --methods '[vpt-deep,spt-deep,apt,ipt,bpt]' --search "$lrs"
    python3 -m selfprompt bench "${common[@]}" --output_dir "$out/successors_vipamin" \
        --methods '[spt-deep]' --inits '[vipamin]' --search "$prompt"
done
