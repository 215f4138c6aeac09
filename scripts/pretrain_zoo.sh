#!/usr/bin/env bash
# Pretrain the zoo's two backbones (recipes/pretrain/*_fmnist.yaml) side by side on one machine, each
# run sized to a wall-time budget: a one-epoch probe of each (run side by side, as the real runs are)
# sets the number of epochs, then both train from scratch with that schedule.
# Usage: scripts/pretrain_zoo.sh OUT_DIR BUDGET_SECONDS [FASHION_MNIST_DIR]
# Then:  selfprompt zoo export OUT_DIR/mae --name vit_mini_patch4_32.mae_fmnist  (and sup likewise)
set -euo pipefail
out=$1
budget=$2
root=${3:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
run() {  # objective, extra arguments...
    local objective=$1
    shift
    python3 -m selfprompt pretrain "recipes/pretrain/${objective}_fmnist.yaml" --data.root "$root" \
        --progress false "$@"
}
for objective in mae sup; do
    run "$objective" --optim.epochs 1 --optim.warmup_epochs 0 --output_dir "$out/probe-$objective" \
        >"$out/probe-$objective.log" 2>&1 &
done
wait
epochs() {
    python3 -c "import json; s = json.load(open('$out/probe-$1/summary.json')); print(max(1, int($budget / s['wall_time_s'])))"
}
for objective in mae sup; do
    n=$(epochs "$objective")
    echo "$objective: $n epochs in about $budget s"
    run "$objective" --optim.epochs "$n" --optim.warmup_epochs $(((n + 9) / 10)) --output_dir "$out/$objective" \
        >"$out/$objective.log" 2>&1 &
done
wait
tail -n 2 "$out"/mae.log "$out"/sup.log
