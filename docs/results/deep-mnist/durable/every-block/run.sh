#!/bin/bash
# Issue 26's screen, by PROTOCOL.md (beside this file), serial and resumable: a finished step
# is skipped. From the repo root:
#   bash docs/results/deep-mnist/durable/every-block/run.sh WORK_DIR screen
#   bash docs/results/deep-mnist/durable/every-block/run.sh WORK_DIR confirm CANDIDATE...
# screen: per candidate, λ on seed 1 by the D_P rule (the largest λ of its grid, scanning
# upwards, whose D_P held-out accuracy is within 1 point of θ_0's), then one `durable` card
# at that λ with the control of the same blocks and length; every card on one storage.
# A candidate that fails the rule at every λ of its grid scans downwards by decades from the
# grid's smallest (PROTOCOL.md, amendment 1) and keeps the first λ that passes.
# confirm: seeds 2 and 3 of the named candidates at their selected λ.
# Runs the package of the folder it is started from (python -m), not whichever is installed.
set -u
work=${1:?work dir}; stage=${2:?screen or confirm}; shift 2
mkdir -p "$work/cards" "$work/fits"
storage="sqlite:///$work/studies.db"
cli() { python -m lightning_immunize.cli "$@"; }

# candidate → "objective-class λ-key(s) grid epochs"
declare -A spec=(
  [ours_kfac-2]="LayerwiseConditionNumberObjective lambda_pretrain,lambda_harmful 1 10 100 1000;2"
  [ours_kfac-6]="LayerwiseConditionNumberObjective lambda_pretrain,lambda_harmful 1 10 100 1000;6"
  [ours_kfac_ratio-2]="LayerwiseConditionNumberObjective lambda_harmful 1 10 100 1000;2"
  [erasure-2]="BlockErasureObjective lambda_harmful 0.1 1 10 100;2"
  [erasure-6]="BlockErasureObjective lambda_harmful 0.1 1 10 100;6"
  [ours-all]="ConditionNumberObjective lambda_harmful 1 10 100 1000;2"
  [sophon-all]="SimulatedAttackObjective lambda_harmful 1 10 100;2"
)
order=(ours_kfac-2 ours_kfac_ratio-2 erasure-2 ours_kfac-6 erasure-6 ours-all sophon-all)

config_pretrain() {  # λ_H → λ_P at the config's λ_P/λ_H ratio, 3e-3/1000
  python -c "print($1 * 3e-6)"
}

objective_args() {  # objective_args CLASS KEYS λ → command-line arguments
  local class=$1 keys=$2 lam=$3
  local args=(--model.objective "$class")  # apart: a `local` expands its words first
  for key in ${keys//,/ }; do args+=("--model.objective.init_args.$key" "$lam"); done
  case $class in
    ConditionNumberObjective)
      args+=(--model.objective.init_args.lambda_pretrain "$(config_pretrain "$lam")"
             --model.objective.init_args.preconditioner none);;
    SimulatedAttackObjective) args+=(--model.objective.init_args.inner_steps 3
                                     --model.objective.init_args.seed 0);;
    BlockErasureObjective)
      args+=(--model.objective.init_args.blocks "[layer1, layer2, layer3, layer4, head]");;
    LayerwiseConditionNumberObjective)  # λ_H alone given: the config's λ_P/λ_H (amendment 2)
      [ "$keys" = lambda_harmful ] && args+=(--model.objective.init_args.lambda_pretrain \
        "$(config_pretrain "$lam")");;
  esac
  printf '%s\n' "${args[@]}"
}

fit() {  # fit DIR SEED EPOCHS ARGS... → the run folder (every block trainable)
  local d=$1 seed=$2 epochs=$3; shift 3
  mkdir -p "$d"
  if [ ! -f "$d/done" ]; then
    rm -rf "$d/lightning_logs"  # an interrupted fit's version_0 would shift this one to version_1
    local start=$(date +%s)
    cli fit --config configs/cnn_mnist.yaml "$@" --seed_everything "$seed" \
      --model.extractor.init_args.trainable null --trainer.max_epochs "$epochs" \
      --trainer.default_root_dir "$d" --trainer.enable_progress_bar false > "$d/fit.log" 2>&1 \
      || { echo "fit $d failed (see $d/fit.log)" >&2; return 1; }
    echo $(( $(date +%s) - start )) > "$d/done"
  fi
  echo "$d/lightning_logs/version_0"
}

within_one_point() {  # RUN → exit 0 when D_P held-out accuracy ≥ θ_0's − 0.01
  python -c "import json,sys; d=json.load(open('$1/immunization.json')); sys.exit(0 if d['task_metric'] >= d['task_metric_before'] - 0.01 else 1)"
}

control() {  # control SEED EPOCHS → the λ = 0 fit of every block for that length
  fit "$work/fits/control-all-e$2-s$1" "$1" "$2" \
    --model.objective.init_args.lambda_harmful 0 --model.objective.init_args.lambda_pretrain 0
}

card() {  # card NAME RUN CONTROL
  local out="$work/cards/$1"
  [ -f "$out/card.json" ] && return 0
  local start=$(date +%s)
  cli attack "$2" --budget durable --control "$3" --storage "$storage" --out "$out" \
    --no-progress > "$out.log" 2>&1 || { echo "card $out failed (see $out.log)" >&2; return 1; }
  echo "$1: $(( $(date +%s) - start )) s" | tee -a "$work/cards/times.txt"
}

selected() {  # selected CANDIDATE → its λ from selection.txt ("" if none)
  awk -v c="$1" '$1 == c":" {print $4}' "$work/selection.txt" 2>/dev/null | tail -1
}

candidate_run() {  # candidate_run CANDIDATE λ SEED → the run folder
  local c=$1 lam=$2 seed=$3 class keys grid epochs
  read -r class keys grid <<< "${spec[$c]%%;*}"; epochs=${spec[$c]##*;}
  mapfile -t args < <(objective_args "$class" "$keys" "$lam")
  fit "$work/fits/$c-λ$lam-s$seed" "$seed" "$epochs" "${args[@]}"
}

case $stage in
  screen)
    for c in "${order[@]}"; do
      lam=$(selected "$c")
      if [ -z "$lam" ]; then
        read -r class keys grid <<< "${spec[$c]%%;*}"
        for value in ${grid}; do
          run=$(candidate_run "$c" "$value" 1) || exit 1
          if within_one_point "$run"; then lam=$value; else break; fi
        done
        echo "$c: λ = ${lam:-none}" | tee -a "$work/selection.txt"
        lam=$(selected "$c")
      fi
      if [ "$lam" = none ] && ! grep -q "^$c: .*second round" "$work/selection.txt"; then
        # PROTOCOL.md's amendment 1: the grid goes on downwards by decades
        read -r class keys grid <<< "${spec[$c]%%;*}"; lam=""
        for value in $(awk -v g="${grid%% *}" 'BEGIN {print g/10, g/100, g/1000}'); do
          run=$(candidate_run "$c" "$value" 1) || exit 1
          if within_one_point "$run"; then lam=$value; break; fi
        done
        echo "$c: λ = ${lam:-none} (second round)" | tee -a "$work/selection.txt"
        lam=$(selected "$c")
      fi
      if [ "$lam" = none ] || [ -z "$lam" ]; then continue; fi
      ctrl=$(control 1 "${spec[$c]##*;}") || exit 1
      run=$(candidate_run "$c" "$lam" 1) || exit 1
      card "$c-s1" "$run" "$ctrl" || exit 1
    done;;
  confirm)
    for c in "$@"; do
      [ -n "${spec[$c]:-}" ] || { echo "unknown candidate '$c'; expected one of: ${order[*]}" >&2; exit 2; }
      lam=$(selected "$c")
      [ -n "$lam" ] && [ "$lam" != none ] || { echo "$c has no selected λ; run the screen first" >&2; exit 2; }
      for seed in 2 3; do
        ctrl=$(control "$seed" "${spec[$c]##*;}") || exit 1
        run=$(candidate_run "$c" "$lam" "$seed") || exit 1
        card "$c-s$seed" "$run" "$ctrl" || exit 1
      done
    done;;
  *) echo "unknown stage '$stage'; expected 'screen' or 'confirm'" >&2; exit 2;;
esac
