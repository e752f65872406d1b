#!/bin/bash
# Issue 18's measurement, serial (2 CPU cores), resumable: a finished step is skipped.
#   bash docs/results/deep-mnist/durable/run.sh WORK_DIR [SEEDS...]      (from the repo root)
#   SELECTED="sophon=10 tar=10 ours_sa=10" bash .../run.sh WORK_DIR [SEEDS...]
#      skips step 1 and uses these λs (issue 24's re-run: issue 18's selection, frozen).
# Runs the package of the folder it is started from (python -m), not whichever is installed.
# 1. selection on seed 1: for sophon, tar and ours_sa, λ (SOPHON's/TAR's λ_H, ours_sa's λ_A)
#    in 1, 10, 100, K = 3, every other setting its default (ours_sa: ours' cnn_mnist λs);
#    the rule: the largest λ whose D_P held-out accuracy is within 1 point of θ_0's,
#    scanning upwards and stopping at the first that is not.
# 2. the `durable` card (configs/attack.yaml) of each method's run, seeds in order, with the
#    control of its seed (ours' config with every immunization term at 0: the same blocks, steps,
#    optimizer and data order; with every term off, each method's training is that one); all
#    cards share one Optuna storage, so θ_0's, scratch's, the ceiling's and a seed's control's
#    searches run once.
set -u
work=${1:?work dir}; shift
seeds=${*:-1 2 3}
mkdir -p "$work/cards"
storage="sqlite:///$work/studies.db"
class_of() { case $1 in
  sophon) echo lightning_immunize.objectives.SimulatedAttackObjective;;
  tar) echo lightning_immunize.objectives.TamperResistanceObjective;;
  ours_sa) echo lightning_immunize.objectives.AttackerAwareConditionNumberObjective;;
esac; }
lam_key() { [ "$1" = ours_sa ] && echo lambda_attack || echo lambda_harmful; }

fit() {  # fit METHOD LAMBDA SEED → run folder $work/fits/METHOD-λLAMBDA-sSEED (ours: ours-sSEED)
  local m=$1 lam=$2 seed=$3 d="$work/fits/$1-λ$2-s$3"
  [ "$m" = ours ] && d="$work/fits/ours-s$3"
  mkdir -p "$d"
  if [ ! -f "$d/done" ]; then
    rm -rf "$d/lightning_logs"  # an interrupted fit's version_0 would shift this one to version_1
    local extra=()
    if [ "$m" != ours ]; then
      printf 'model:\n  objective:\n    class_path: %s\n    init_args: {%s: %s, inner_steps: 3, seed: 0}\n' \
        "$(class_of "$m")" "$(lam_key "$m")" "$lam" > "$d/objective.yaml"
      [ "$m" = ours_sa ] && printf 'model:\n  objective:\n    init_args: {lambda_pretrain: 3.0e-3, lambda_harmful: 1000.0, preconditioner: none}\n' > "$d/ours.yaml" && extra+=(--config "$d/ours.yaml")
      extra=(--config "$d/objective.yaml" "${extra[@]}")
    fi
    local start=$(date +%s)
    python -m lightning_immunize.cli fit --config configs/cnn_mnist.yaml "${extra[@]}" --seed_everything "$seed" \
      --trainer.default_root_dir "$d" --trainer.enable_progress_bar false > "$d/fit.log" 2>&1 || { echo "fit $d failed"; exit 1; }
    echo $(( $(date +%s) - start )) > "$d/done"
  fi
  echo "$d/lightning_logs/version_0"
}

within_one_point() {  # RUN → exit 0 when D_P held-out accuracy ≥ θ_0's − 0.01
  python -c "import json,sys; d=json.load(open('$1/immunization.json')); sys.exit(0 if d['task_metric'] >= d['task_metric_before'] - 0.01 else 1)"
}

declare -A chosen=([ours]=0)
for pair in ${SELECTED:-}; do chosen[${pair%%=*}]=${pair#*=}; done
for m in sophon tar ours_sa; do
  if [ -n "${chosen[$m]:-}" ]; then echo "$m: λ = ${chosen[$m]} (given)" | tee -a "$work/selection.txt"; continue; fi
  chosen[$m]=""
  for lam in 1 10 100; do
    run=$(fit "$m" "$lam" 1) || exit 1
    if within_one_point "$run"; then chosen[$m]=$lam; else break; fi
  done
  [ -n "${chosen[$m]}" ] || { echo "$m: no λ keeps D_P within 1 point"; chosen[$m]=1; }
  echo "$m: λ = ${chosen[$m]}" | tee -a "$work/selection.txt"
done

control() {  # control SEED → run folder of the λ = 0 fit of ours' config
  local d="$work/fits/control-s$1"
  mkdir -p "$d"
  if [ ! -f "$d/done" ]; then
    rm -rf "$d/lightning_logs"  # an interrupted fit's version_0 would shift this one to version_1
    python -m lightning_immunize.cli fit --config configs/cnn_mnist.yaml --seed_everything "$1" \
      --model.objective.init_args.lambda_harmful 0 --model.objective.init_args.lambda_pretrain 0 \
      --trainer.default_root_dir "$d" --trainer.enable_progress_bar false > "$d/fit.log" 2>&1 \
      || { echo "control fit $d failed"; exit 1; }
    touch "$d/done"
  fi
  echo "$d/lightning_logs/version_0"
}

for seed in $seeds; do
  ctrl=$(control "$seed") || exit 1
  for m in ours sophon tar ours_sa; do
    run=$(fit "$m" "${chosen[$m]}" "$seed") || exit 1
    out="$work/cards/$m-s$seed"
    [ -f "$out/card.json" ] && continue
    start=$(date +%s)
    python -m lightning_immunize.cli attack "$run" --budget durable --control "$ctrl" --storage "$storage" \
      --out "$out" --no-progress \
      > "$work/cards/$m-s$seed.log" 2>&1 || { echo "card $out failed"; exit 1; }
    echo "$m seed $seed card: $(( $(date +%s) - start )) s" | tee -a "$work/cards/times.txt"
  done
done
