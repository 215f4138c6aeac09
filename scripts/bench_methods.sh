#!/usr/bin/env bash
# The CPU grids behind docs/results.md's sections on every method, SPT initialisation, Prompt Condensation
# and the per-method searches (MAE zoo backbone, seed 0 unless said; 2 CPU cores, one thread per cell):
#   methods   {linear, vpt-deep, bitfit, lora, adaptformer, ssf, gapt, e2vpt, vfpt, cvpt, pc keep 0.5/0.3/0.1}
#             on mnist, dsprites_location, clevr_distance
#   spt_init  {gapt, e2vpt, vfpt, cvpt} with SPT's kmeans prototypes, same tasks
#   vpt_m3    vpt-deep with M = 3 (M = 1, 5 and 10 are in the length grid of scripts/bench_grids.sh)
#   cvpt_lr   CVPT at vpt_deep.yaml's rates (its paper's lr 1e-3 underfits in 10 epochs), xavier and kmeans
#   science   {vpt-deep, spt-deep}, each with its own lr search on val, seeds 0-2,
#             on dsprites_location and clevr_distance
#   methods_sup  the methods grid without pc on the supervised zoo backbone
# Finished cells are never rerun: running it again goes on where it stopped.
# Usage: scripts/bench_methods.sh VTAB_MINI_ROOT OUT_DIR [extra selfprompt-bench arguments...]
set -euo pipefail
root=$1
out=$2
shift 2
common=(--root "$root" --backbones '[vit_mini_patch4_32.mae_fmnist]' --device cpu --workers 2 --threads 1 "$@")
three='[mnist,dsprites_location,clevr_distance]'
bench() { python3 -m selfprompt bench "${common[@]}" "$@"; }
bench --output_dir "$out/methods_cpu" --tasks "$three" --seeds '[0]' --keep '[0.5,0.3,0.1]' \
    --methods '[linear,vpt-deep,bitfit,lora,adaptformer,ssf,gapt,e2vpt,vfpt,cvpt,pc]'
bench --output_dir "$out/spt_init_cpu" --tasks "$three" --seeds '[0]' --methods '[gapt,e2vpt,vfpt,cvpt]' \
    --inits '[kmeans]'
bench --output_dir "$out/vpt_m3_cpu" --tasks "$three" --seeds '[0]' --methods '[vpt-deep]' --num_prompts '[3]'
bench --output_dir "$out/cvpt_lr_cpu" --tasks "$three" --seeds '[0]' --methods '[cvpt]' --inits '[xavier,kmeans]' \
    --overrides '[--optim.lr, "5e-2", --optim.weight_decay, "1e-2", --optim.head_weight_decay, "0.5"]'
bench --output_dir "$out/science_mae" --tasks '[dsprites_location,clevr_distance]' --seeds '[0,1,2]' \
    --methods "[vpt-deep,spt-deep]" --search '{"optim.lr": [5e-2, 1e-2, 1e-3]}'
bench --output_dir "$out/methods_sup_cpu" --tasks "$three" --seeds '[0]' \
    --backbones '[vit_mini_patch4_32.sup_fmnist]' \
    --methods '[linear,vpt-deep,bitfit,lora,adaptformer,ssf,gapt,e2vpt,vfpt,cvpt]'
