"""Per-step wall time of each immunization objective against a plain fine-tuning step.

    python benchmarks/bench_objectives.py [--repeats 20] [--warmup 3] [--threads N]
                                          [--plain both|pretrain] [--trainable all]
                                          [--only NAME ...] [--quick]

One step is what ``ImmunizationModule.training_step`` does, without a Trainer::

    optimizer.zero_grad(); module.objective.backward(module, batch); optimizer.step()

(``module.manual_backward`` replaced by a plain ``loss.backward()``), for

* ``plain``: ordinary fine-tuning of the same model on the same batch: task loss,
  ``backward()``, ``optimizer.step()``; with ``--plain both`` (default) the task loss covers
  both sides of the batch (2·B samples), with ``--plain pretrain`` the D_P side only;
* ``ours``: :class:`~lightning_immunize.objectives.ConditionNumberObjective`, preconditioner
  ``"none"`` (λ_P = 3e-3, λ_H = 1000, as ``bench_step.py``);
* ``sophon K=1|3``: :class:`~lightning_immunize.objectives.SimulatedAttackObjective`
  (defaults: SGD or Adam attacker, lr log-uniform in [1e-4, 0.1], D_P fine-tuning term on);
* ``tar K=1|3``: :class:`~lightning_immunize.objectives.TamperResistanceObjective`
  (defaults; the entropy loss averaged over the K attack steps);
* ``ours_sa K=3``: ours (as above) plus SOPHON's terms with K = 3
  (:class:`~lightning_immunize.objectives.AttackerAwareConditionNumberObjective`);
* ``ours_kfac``: :class:`~lightning_immunize.objectives.LayerwiseConditionNumberObjective`
  (λ_P = 0.1, λ_H = 1, every trainable conv and the head: 11 layers (21 with every block));
* ``erasure``: :class:`~lightning_immunize.objectives.BlockErasureObjective` (λ_H = 1,
  ``layer3``, ``layer4`` and the features).

The model is the deep MNIST shape: timm ``resnet18``, ``in_chans=1``, 28×28 random "digits",
10 classes, ``trainable=["layer3", "layer4"]`` (``--trainable all``: every block), SGD
Nesterov (lr 1e-3), batch 64 per side, on the CPU. ``--quick`` checks that the script runs:
timm ``test_resnet``, batch 8, 3 timed steps after 1 warm-up. Each repeat runs one step of
every case back to back (each case on its own copy of the model, with its own optimizer),
after ``--warmup`` untimed rounds; the table gives the medians and their ratio to the plain
step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from bench_step import immunization_step, plain_step  # the same steps as bench_step.py

from lightning_immunize.models import TimmBackbone
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import (
    AttackerAwareConditionNumberObjective,
    BlockErasureObjective,
    ConditionNumberObjective,
    LayerwiseConditionNumberObjective,
    Objective,
    SimulatedAttackObjective,
    TamperResistanceObjective,
)

CLASSES = 10


def mnist_like(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, 28, 28)`` sparse non-negative "digits", normalised like MNIST."""
    ink = torch.rand(n, 1, 28, 28, generator=generator)
    mask = torch.rand(n, 1, 28, 28, generator=generator) < 0.2
    return (ink * mask - 0.1307) / 0.3081


def objectives() -> dict[str, Callable[[], Objective | None]]:
    """Case name → objective factory (``None``: the plain fine-tuning step)."""
    return {
        "plain": lambda: None,
        "ours (none)": lambda: ConditionNumberObjective(3e-3, 1000.0, preconditioner="none"),
        "sophon K=1": lambda: SimulatedAttackObjective(inner_steps=1),
        "sophon K=3": lambda: SimulatedAttackObjective(inner_steps=3),
        "tar K=1": lambda: TamperResistanceObjective(inner_steps=1),
        "tar K=3": lambda: TamperResistanceObjective(inner_steps=3),
        "ours_sa K=3": lambda: AttackerAwareConditionNumberObjective(
            3e-3, 1000.0, preconditioner="none", inner_steps=3
        ),
        "ours_kfac": lambda: LayerwiseConditionNumberObjective(0.1, 1.0),
        "erasure": lambda: BlockErasureObjective(1.0),
    }


def build(
    model_name: str, batch: int, trainable: list[str] | None = ("layer3", "layer4")
) -> tuple[ImmunizationModule, dict]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    backbone = TimmBackbone(
        model_name,
        pretrained=False,
        trainable=None if trainable is None else list(trainable),
        in_chans=1,
        num_classes=CLASSES,
        seed=0,
    )
    module = ImmunizationModule(
        backbone,
        None,  # the timm model's own classifier
        ConditionNumberObjective(3e-3, 1000.0, preconditioner="none"),  # replaced per case
        optimizer=partial(torch.optim.SGD, lr=1e-3, momentum=0.9, nesterov=True),
    )
    data = {
        side: (mnist_like(batch, gen), torch.randint(0, CLASSES, (batch,), generator=gen))
        for side in ("pretrain", "harmful")
    }
    return module, data


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each case")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--plain",
        choices=("both", "pretrain"),
        default="both",
        help="the plain step's task loss covers both sides of the batch (2·B samples, the "
        "default) or the D_P side only (B samples)",
    )
    parser.add_argument(
        "--trainable",
        choices=("layer3+layer4", "all"),
        default="layer3+layer4",
        help="the blocks every case trains (and the every-layer objectives regularize)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="time only these cases (and plain), e.g. --only ours_kfac erasure",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: timm test_resnet, batch 8, 3 timed steps after 1 warm-up",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be ≥ 1 and --warmup ≥ 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name, batch_size = ("test_resnet", 8) if args.quick else ("resnet18", 64)
    plain_sides = ("pretrain", "harmful") if args.plain == "both" else ("pretrain",)

    trainable = None if args.trainable == "all" else ["layer3", "layer4"]
    base, batch = build(model_name, batch_size, trainable)
    cases = objectives()
    unknown = sorted(set(args.only or []) - set(cases))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(cases)}")
    if args.only:
        cases = {n: f for n, f in cases.items() if n == "plain" or n in args.only}
    steps: dict[str, Callable[[], None]] = {}
    for name, make in cases.items():
        module = copy.deepcopy(base)
        objective = make()
        if objective is not None:
            module.objective = objective
            objective.prepare(module)
        module.train()
        module.manual_backward = lambda loss: loss.backward()
        optimizer = module.configure_optimizers()
        if objective is None:
            steps[name] = partial(plain_step, module, optimizer, batch, plain_sides)
        else:
            steps[name] = partial(immunization_step, module, optimizer, batch)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():
            ms = timed(step)
            if i >= args.warmup:
                times[name].append(ms)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; timm {model_name} "
        f"in_chans=1 28×28, trainable {args.trainable}; batch {batch_size} per side; median of "
        f"{args.repeats} steps after {args.warmup} warm-up; plain step on "
        f"{' + '.join(plain_sides)}"
    )
    header = f"{'objective':<14} {'ms / step':>10} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    plain_ms = statistics.median(times["plain"])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:<14} {ms:>10.2f} {ms / plain_ms:>6.2f}×")


if __name__ == "__main__":
    main()
