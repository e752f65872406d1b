"""Per-step wall time of an immunization step against a plain fine-tuning step.

    python benchmarks/bench_step.py [--repeats 20] [--threads N] [--cases linear784-f64,...]
                                    [--plain both|pretrain]

The immunization step is what ``ImmunizationModule.training_step`` does, without a Trainer::

    optimizer.zero_grad(); module.objective.backward(module, batch); optimizer.step()

with :class:`~lightning_immunize.objectives.ConditionNumberObjective` (``module.manual_backward``
is replaced by a plain ``loss.backward()``). The plain step is ordinary fine-tuning of the
same model on the same batch: task loss, ``backward()``, ``optimizer.step()``. With
``--plain both`` (default) its task loss covers both sides of the batch (the same 2·B
samples the immunization step pushes through the extractor), so the ratio measures the cost
of the regularizers themselves; ``--plain pretrain`` takes the D_P side only (B samples).

Each repeat runs one plain and one immunization step back to back (on two copies of the
model, each with its own optimizer), after ``--warmup`` untimed steps of each; the table
gives the medians and their ratio. On CUDA every timing is bracketed by
``torch.cuda.synchronize()``. Cases:

* ``linear784-f64`` / ``linear784-f32``: ``LinearExtractor`` 784→784, binary head, exact
  preconditioner, λ_P = 1, λ_H = 1000, Adam, batch 64 of MNIST-like random images (CPU);
* ``resnet18-28px``: timm ``resnet18``, ``in_chans=1``, 28×28, ``trainable="last:2"``,
  no preconditioner, λ_P = 3e-3, λ_H = 1000, SGD Nesterov, batch 64 (CPU);
* ``vit-tiny-32px``: timm ``vit_tiny_patch16_224`` with ``img_size=32, patch_size=8``,
  ``trainable="last:1"``, same objective and optimizer, batch 64 (CPU);
* ``resnet18-224px-cuda`` / ``vit-b16-224px-cuda``: timm ``resnet18``
  (``trainable="last:2"``) and ``vit_base_patch16_224`` (``trainable="last:1"``),
  ``pretrained=False``, 1000 classes, batch 64 at 224 px on the GPU; only when
  ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from lightning_immunize.models import LinearExtractor, LinearHead, TimmBackbone
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import ConditionNumberObjective

BATCH = 64
TARGETS = {"linear784": 2.0, "resnet18-224px-cuda": 1.15, "vit-b16-224px-cuda": 1.15}
TARGET_LINE = "targets: ratio ≤ 2× for linear 784 on CPU; ≤ 1.15× for ResNet18 and ViT-B/16 on GPU"


@dataclass
class Case:
    name: str
    build: Callable[[torch.device], tuple[ImmunizationModule, dict]]
    cuda: bool = False


def mnist_like(n: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``(n, 1, 28, 28)`` sparse non-negative "digits", normalised like MNIST."""
    ink = torch.rand(n, 1, 28, 28, generator=generator)
    mask = torch.rand(n, 1, 28, 28, generator=generator) < 0.2
    return ((ink * mask - 0.1307) / 0.3081).to(dtype)


def build_linear(dtype: torch.dtype, device: torch.device) -> tuple[ImmunizationModule, dict]:
    gen = torch.Generator().manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(784, 784, seed=1, dtype=dtype),
        LinearHead(784, 1, task="binary").to(dtype),
        ConditionNumberObjective(1.0, 1000.0, preconditioner="exact"),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )
    batch = {
        side: (
            mnist_like(BATCH, gen, dtype).flatten(1),
            torch.randint(0, 2, (BATCH,), generator=gen).to(dtype),
        )
        for side in ("pretrain", "harmful")
    }
    return module.to(device), batch


def build_timm(
    model_name: str,
    shape: tuple[int, int, int],
    trainable: str,
    num_classes: int,
    device: torch.device,
    **timm_kwargs,
) -> tuple[ImmunizationModule, dict]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    backbone = TimmBackbone(
        model_name,
        pretrained=False,
        trainable=trainable,
        in_chans=shape[0],
        num_classes=num_classes,
        **timm_kwargs,
    )
    module = ImmunizationModule(
        backbone,
        None,  # the timm model's own classifier
        ConditionNumberObjective(3e-3, 1000.0, preconditioner="none"),
        optimizer=partial(torch.optim.SGD, lr=1e-3, momentum=0.9, nesterov=True),
        label_smoothing=0.1,
    )
    if shape == (1, 28, 28):
        images = [mnist_like(BATCH, gen, torch.float32) for _ in range(2)]
    else:
        images = [torch.randn(BATCH, *shape, generator=gen) for _ in range(2)]
    batch = {
        side: (x, torch.randint(0, num_classes, (BATCH,), generator=gen))
        for side, x in zip(("pretrain", "harmful"), images, strict=True)
    }
    return module.to(device), batch


CASES = [
    Case("linear784-f64", partial(build_linear, torch.float64)),
    Case("linear784-f32", partial(build_linear, torch.float32)),
    Case("resnet18-28px", partial(build_timm, "resnet18", (1, 28, 28), "last:2", 10)),
    Case(
        "vit-tiny-32px",
        partial(
            build_timm, "vit_tiny_patch16_224", (3, 32, 32), "last:1", 10, img_size=32, patch_size=8
        ),
    ),
    Case(
        "resnet18-224px-cuda",
        partial(build_timm, "resnet18", (3, 224, 224), "last:2", 1000),
        cuda=True,
    ),
    Case(
        "vit-b16-224px-cuda",
        partial(build_timm, "vit_base_patch16_224", (3, 224, 224), "last:1", 1000),
        cuda=True,
    ),
]


def immunization_step(module: ImmunizationModule, optimizer, batch: dict) -> None:
    optimizer.zero_grad()
    module.objective.backward(module, batch)
    optimizer.step()


def plain_step(module: ImmunizationModule, optimizer, batch: dict, sides: tuple[str, ...]) -> None:
    optimizer.zero_grad()
    loss = sum(module.task_loss(module.extractor(batch[s][0]), batch[s][1]) for s in sides)
    loss.backward()
    optimizer.step()


def timed(step: Callable[[], None], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def run_case(case: Case, repeats: int, warmup: int, plain_sides: tuple[str, ...]):
    device = torch.device("cuda" if case.cuda else "cpu")
    immunized, batch = case.build(device)
    immunized.train()
    immunized.manual_backward = lambda loss: loss.backward()
    plain = copy.deepcopy(immunized)
    batch = {side: tuple(t.to(device) for t in pair) for side, pair in batch.items()}
    opt_imm = immunized.configure_optimizers()
    opt_plain = plain.configure_optimizers()
    steps = {
        "plain": partial(plain_step, plain, opt_plain, batch, plain_sides),
        "immunization": partial(immunization_step, immunized, opt_imm, batch),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            ms = timed(step, case.cuda)
            if i >= warmup:
                times[name].append(ms)
    return statistics.median(times["plain"]), statistics.median(times["immunization"])


def target_for(name: str) -> float | None:
    if name.startswith("linear784"):
        return TARGETS["linear784"]
    return TARGETS.get(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated, from {', '.join(c.name for c in CASES)} (default: all; the "
        "-cuda ones only with a GPU)",
    )
    parser.add_argument(
        "--plain",
        choices=("both", "pretrain"),
        default="both",
        help="the plain step's task loss covers both sides of the batch (2·B samples, the "
        "default) or the D_P side only (B samples)",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be ≥ 1 and --warmup ≥ 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    by_name = {c.name: c for c in CASES}
    if args.cases:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            parser.error(f"unknown cases {unknown}; choose from {list(by_name)}")
    else:
        names = list(by_name)
    cuda = torch.cuda.is_available()
    skipped = [n for n in names if by_name[n].cuda and not cuda]
    names = [n for n in names if n not in skipped]
    plain_sides = ("pretrain", "harmful") if args.plain == "both" else ("pretrain",)

    gpu = f", GPU {torch.cuda.get_device_name()}" if cuda else ""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads{gpu}; batch "
        f"{BATCH} per side; median of {args.repeats} steps after {args.warmup} warm-up; "
        f"plain step on {' + '.join(plain_sides)}"
    )
    header = f"{'case':<22} {'plain ms':>10} {'immunization ms':>16} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for name in names:
        plain_ms, imm_ms = run_case(by_name[name], args.repeats, args.warmup, plain_sides)
        ratio = imm_ms / plain_ms
        target = target_for(name)
        verdict = (
            "" if target is None else f"≤ {target:g}× {'met' if ratio <= target else 'MISSED'}"
        )
        print(f"{name:<22} {plain_ms:>10.2f} {imm_ms:>16.2f} {ratio:>6.2f}×  {verdict}")
    if skipped:
        print(f"skipped (no CUDA device): {', '.join(skipped)}")
    print(TARGET_LINE)


if __name__ == "__main__":
    main()
