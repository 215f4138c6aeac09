#!/usr/bin/env bash
# E2VPT's pruning and rewind on VTAB-mini (MAE zoo backbone, seed 0, 2 CPU cores, one thread per run):
#   1. selfprompt bench: e2vpt with N_P = 10, 5 and 1 visual prompts per layer, trained from scratch;
#   2. selfprompt prune: the N_P = 10 cell's visual prompts scored on its training images (final stage);
#   3. e2vpt rewound from its initial values (same seed) with each (token, segment) share pruned;
#   4. the official protocol on dsprites_location and clevr_distance: e2vpt's tune stage (train800 -> val200)
#      scored by prune --stage tune, then selfprompt sweep over the shares (chosen on val, tested once).
# Prints tables and writes OUT_DIR/e2vpt_pruning_cpu/pruning.csv. Finished runs are not rerun.
# Usage: scripts/bench_e2vpt_pruning.sh VTAB_MINI_ROOT OUT_DIR
set -euo pipefail
root=$1
out=$2/e2vpt_pruning_cpu
backbone=vit_mini_patch4_32.mae_fmnist
tasks=(mnist dsprites_location clevr_distance)
pairs=("0.5 0" "0.9 0" "0.5 0.5" "0 0.5")
recipe=$(python3 -c "import selfprompt.apps.bench as b; print(b.RECIPES / 'e2vpt.yaml')")
python3 -m selfprompt bench --root "$root" --backbones "[$backbone]" --device cpu --workers 2 --threads 1 \
    --output_dir "$out" --tasks "[$(IFS=,; echo "${tasks[*]}")]" --seeds '[0]' --methods '[e2vpt]' \
    --num_prompts '[10,5,1]'
jobs=()
for task in "${tasks[@]}"; do
    source_run="$out/cells/$backbone/$task/e2vpt[M=10]/seed0"
    python3 -m selfprompt prune "$source_run" --seed 0 --device cpu --output "$out/pruned/$task/pruning.json"
    for pair in "${pairs[@]}"; do
        read -r tokens segments <<< "$pair"
        jobs+=("$task $tokens $segments")
    done
done
run_pruned() {
    read -r task tokens segments <<< "$1"
    dir="$out/pruned/$task/tokens$tokens-segments$segments"
    [[ -f "$dir/summary.json" ]] && return 0
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python3 -m selfprompt train "$recipe" \
        --model.backbone "$backbone" --model.pool avg --data.root "$root" --data.benchmark vtab-mini \
        --data.task "$task" --seeds '[0]' --stage final --device cpu --progress false --prompt.num_prompts 10 \
        --e2vpt.pruning "$out/pruned/$task/pruning.json" --e2vpt.prune_tokens "$tokens" \
        --e2vpt.prune_segments "$segments" --output_dir "$dir" > "$dir.log" 2>&1
}
export -f run_pruned
export out root backbone recipe
mkdir -p "$out/pruned"
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run_pruned "$@"' _ {}
common=(--model.backbone "$backbone" --model.pool avg --data.root "$root" --data.benchmark vtab-mini
    --seeds '[0]' --device cpu --progress false)
searched() {
    task=$1
    dir="$out/searched/$task"
    resume=$([[ -f "$dir/source/config.yaml" ]] && echo true || echo false)
    [[ -f "$dir/source/summary.json" ]] || OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python3 -m selfprompt train \
        "$recipe" "${common[@]}" --data.task "$task" --stage tune --resume "$resume" --output_dir "$dir/source" \
        > "$dir.log" 2>&1
    python3 -m selfprompt prune "$dir/source" --stage tune --device cpu --output "$dir/pruning.json" >> "$dir.log"
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python3 -m selfprompt sweep "$recipe" "${common[@]}" --data.task "$task" \
        --e2vpt.pruning "$dir/pruning.json" --output_dir "$dir/sweep" \
        --search '{"e2vpt.prune_tokens": [0.5, 0.9], "e2vpt.prune_segments": [0, 0.5]}' >> "$dir.log" 2>&1
}
mkdir -p "$out/searched"
searched dsprites_location &
searched clevr_distance &
wait
python3 - "$out" <<'PY'
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for cell in sorted(out.glob("cells/*/*/e2vpt*/seed0/cell.json")):
    r = json.loads(cell.read_text())
    rows.append({"task": r["task"], "variant": f"N_P={r['num_prompts']} from scratch",
                 "test_acc": r["test_acc"], "trainable_parameters": r["trainable_parameters"]})
for summary in sorted(out.glob("pruned/*/tokens*/summary.json")):
    final = next(r for r in json.loads(summary.read_text())["results"] if r["stage"] == "final")
    tokens, segments = summary.parent.name.removeprefix("tokens").split("-segments")
    rows.append({"task": summary.parent.parent.name, "variant": f"N_P=10 pruned {tokens}/{segments}, rewound",
                 "test_acc": final["last_test_acc"], "trainable_parameters": final["trainable_parameters"]})
with (out / "pruning.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
for r in rows:
    print(f"{r['task']:18s} {r['variant']:36s} {100 * r['test_acc']:6.2f} {r['trainable_parameters']:8,d}")
print(f"wrote {out / 'pruning.csv'}")
for record in sorted(out.glob("searched/*/sweep/sweep.json")):
    sweep = json.loads(record.read_text())
    trials = ", ".join(f"{t['params']}: val {100 * t['val_acc']:.1f}" for t in sweep["trials"])
    print(f"{record.parent.parent.name}: chosen on val {sweep['best']['params']}, test "
          f"{100 * sweep['final']['test_acc']:.2f}; trials {trials}")
PY
