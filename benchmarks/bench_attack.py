"""Cost of the durability card's trials: seconds per trial and per attacker step of each
family, on a run's models (immunized, θ_0, scratch), and the wall time a budget's trial count
implies.

    python benchmarks/bench_attack.py RUN_DIR [--budget standard] [--steps 30] [--threads N]

RUN_DIR is a ``lightning-immunize fit`` run folder (e.g. of ``configs/cnn_mnist.yaml``; θ_0
comes from its cache). Each family runs one trial per batch size of the search space on the
immunized model, for ``--steps`` steps; the estimate multiplies the mean seconds per step by
the budget's steps (models × trials × horizon) per family and condition, plus scoring.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--budget", default="standard")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from lightning_immunize.attacks.attacker import Attacker, run_attack
    from lightning_immunize.attacks.budgets import load_budget
    from lightning_immunize.attacks.durability import default_families
    from lightning_immunize.attacks.families import PROBE_FAMILIES
    from lightning_immunize.attacks.tasks import attack_tasks, released_models
    from lightning_immunize.build import load_run
    from lightning_immunize.run_folder import resolve_run

    budget = load_budget(args.budget)
    folder = resolve_run(args.run)
    run = load_run(folder.config, folder.checkpoint)
    models = released_models(run.module.extractor, run.theta_0, budget.space.seed)
    tasks = attack_tasks(run.datamodule, budget.eval_samples, budget.space.seed)
    data = tasks.harmful.subset(max(budget.space.batch_sizes), budget.space.seed)
    families = default_families(models["immunized"], budget)
    print(
        f"torch threads {torch.get_num_threads()}; budget {budget.name}: {budget.trials} "
        f"trials x {len(models)} models, horizon {budget.horizon}, "
        f"{len(tasks.harmful.eval_x)} scoring samples"
    )
    print(f"{'family':20s} {'batch':>5s} {'s/trial':>8s} {'ms/step':>8s}")
    per_step: dict[str, float] = {}
    cache: dict = {}
    for family in families:
        run_attack(models["immunized"], data, Attacker(family, "adamw", 1e-3, 32, 1), cache)
        costs = []
        for batch in budget.space.batch_sizes:
            attacker = Attacker(family, "adamw", 1e-3, batch, args.steps, seed=0)
            start = time.perf_counter()
            run_attack(models["immunized"], data, attacker, cache)
            seconds = time.perf_counter() - start
            costs.append(seconds / args.steps)
            print(f"{family:20s} {batch:5d} {seconds:8.2f} {1e3 * seconds / args.steps:8.1f}")
        per_step[family] = statistics.mean(costs)
    studies = {family: len(budget.data_budgets) for family in families}
    for plan in (budget.generalization, budget.trainability):
        if plan is not None:
            for family in plan.families:
                if family in studies:
                    studies[family] += 1
    total = 0.0
    print(f"\nestimated wall time of budget {budget.name!r} (feature caching not counted):")
    for family in families:
        steps = studies[family] * len(models) * budget.trials * budget.horizon
        seconds = steps * per_step[family]
        total += seconds
        kind = "probe" if family in PROBE_FAMILIES else "network"
        print(
            f"  {family:20s} {kind:8s} {studies[family]} condition(s) x {len(models)} models: "
            f"{seconds / 60:6.1f} min"
        )
    print(f"  total {total / 60:.1f} min")


if __name__ == "__main__":
    main()
