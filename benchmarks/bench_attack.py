"""Cost of the durability card's trials: seconds per trial of each family on a run's
immunized model, with the card's speed-ups (fused optimizer kernels, the frozen prefix
computed once) and without them, and the trials per minute they give.

    python benchmarks/bench_attack.py RUN_DIR [--budget standard] [--steps 100] [--repeats 2]

RUN_DIR is a ``lightning-immunize fit`` run folder (e.g. of ``configs/cnn_mnist.yaml``; θ_0
comes from its cache). Each family runs ``--repeats`` trials of ``--steps`` steps (AdamW 1e-3,
each batch size of the search space) on the attacker's smallest data budget, scored on the
selection split at the step marks as in a search. Run it alone: two torch processes on two
cores slow each other many times over. The whole card's wall time is printed by
``lightning-immunize attack`` itself (``card.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch


@contextlib.contextmanager
def speedups(enabled: bool):
    """The card's speed-ups on (as shipped) or off (the per-tensor optimizer loop, the whole
    network forward each step)."""
    from lightning_immunize.attacks.families import base, networks

    fused, prefix = base.fused, networks.FinetuneImmunized.frozen_prefix
    if not enabled:
        base.fused = lambda optimizer, params, **kwargs: optimizer(params, **kwargs)
        networks.FinetuneImmunized.frozen_prefix = False  # and Lora, its subclass
    try:
        yield
    finally:
        base.fused = fused
        networks.FinetuneImmunized.frozen_prefix = prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--budget", default="standard")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from lightning_immunize.attacks.attacker import Attacker
    from lightning_immunize.attacks.budgets import load_budget
    from lightning_immunize.attacks.durability import default_families
    from lightning_immunize.attacks.tasks import attack_tasks, released_models
    from lightning_immunize.attacks.training import run_attack
    from lightning_immunize.build import load_run
    from lightning_immunize.run_folder import resolve_run

    budget = load_budget(args.budget)
    folder = resolve_run(args.run)
    run = load_run(folder.config, folder.checkpoint)
    models = released_models(run.module.extractor, run.theta_0, budget.space.seed)
    tasks = attack_tasks(
        run.datamodule, budget.eval_samples, budget.space.seed, unseen_samples=budget.unseen_samples
    )  # the card's held-out split
    smallest = min(b for b in budget.data_budgets if b is not None)
    data = tasks.harmful.subset(smallest, budget.space.seed)
    families = default_families(models["immunized"], budget)
    print(f"torch threads {torch.get_num_threads()}; {len(data.train_x)} training samples, "
          f"{len(data.eval_x)} selection samples, {args.steps} steps, AdamW 1e-3")  # fmt: skip
    print(f"{'family':20s} {'batch':>5s} {'s/trial before':>15s} {'s/trial after':>14s} "
          f"{'speed-up':>8s}")  # fmt: skip
    totals = {"before": 0.0, "after": 0.0}
    trials = 0
    for family in families:
        for batch in budget.space.batch_sizes:
            seconds = {}
            for label, enabled in (("before", False), ("after", True)):
                with speedups(enabled):
                    cache: dict = {}
                    run_attack(models["immunized"], data, Attacker(family, "adamw", 1e-3, batch, 1),
                               cache)  # fmt: skip
                    runs = []
                    for repeat in range(args.repeats):
                        attacker = Attacker(family, "adamw", 1e-3, batch, args.steps, seed=repeat)
                        start = time.perf_counter()
                        run_attack(models["immunized"], data, attacker, cache)
                        runs.append(time.perf_counter() - start)
                seconds[label] = statistics.median(runs)
                totals[label] += seconds[label]
            trials += 1
            print(f"{family:20s} {batch:5d} {seconds['before']:15.2f} {seconds['after']:14.2f} "
                  f"{seconds['before'] / seconds['after']:7.1f}×")  # fmt: skip
    for label in ("before", "after"):
        print(f"{label}: {60 * trials / totals[label]:.1f} trials per minute "
              f"(one trial per family and batch size)")  # fmt: skip


if __name__ == "__main__":
    main()
