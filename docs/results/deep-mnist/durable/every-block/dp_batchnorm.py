"""How much of a fit's D_P drop is its BatchNorm running statistics: writes dp_batchnorm.md.

python docs/results/deep-mnist/durable/every-block/dp_batchnorm.py WORK_DIR [FIT ...]

For each fit of run.sh (every one under WORK_DIR/fits when none is named): D_P's held-out
accuracy as the fit reports it (the running statistics the fit ended with) and with every
BatchNorm's running statistics recomputed on D_P's training split (the cumulative average
the attack card's ``recalibrate`` uses), against θ_0's. The weights are the same in both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lightning_immunize.attacks.families.preparation import recalibrate_batchnorm
from lightning_immunize.build import load_run
from lightning_immunize.evaluation.report import task_metric

HERE = Path(__file__).resolve().parent


def recalibrated_metric(run_dir: Path) -> tuple[float, float, float]:
    """(θ_0's D_P metric, the fit's as reported, the fit's with D_P-recalibrated BatchNorm)."""
    report = json.loads((run_dir / "immunization.json").read_text())
    run = load_run(run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt")
    x_train = run.datamodule.full_tensors("train")[0]
    recalibrate_batchnorm(run.module.extractor, x_train)
    after = task_metric(run.module, run.datamodule)["task_metric"]
    return report["task_metric_before"], report["task_metric"], after


def main(work: Path, names: list[str]) -> None:
    torch.set_num_threads(1)  # beside a running card
    fits = [work / "fits" / n for n in names] or sorted(
        f for f in (work / "fits").iterdir() if (f / "done").is_file()
    )
    lines = [
        "| fit | D_P held-out, as reported | recalibrated on D_P | θ_0 | change as reported "
        "(points) | change recalibrated (points) |",
        "|---|---|---|---|---|---|",
    ]
    for fit in fits:
        before, reported, after = recalibrated_metric(fit / "lightning_logs" / "version_0")
        lines.append(
            f"| `{fit.name}` | {100 * reported:.2f} % | {100 * after:.2f} % | "
            f"{100 * before:.2f} % | {100 * (reported - before):+.2f} | "
            f"{100 * (after - before):+.2f} |"
        )
        print(lines[-1], flush=True)
    (HERE / "dp_batchnorm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
