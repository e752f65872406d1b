"""Collect run.sh's cards into this folder and write summary.md.

python docs/results/deep-mnist/durable/summarize.py WORK_DIR
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from lightning_immunize.attacks.comparison import (
    GOAL_FAMILIES,
    collect_card,
    comparison_markdown,
    largest_advantage_budget,
    load_card_run,
    reference_advantage,
    removed_cell,
    runs_markdown,
)

HERE = Path(__file__).resolve().parent
ORDER = ("ours", "sophon", "tar", "ours_sa")
FAMILIES = ("probe", *GOAL_FAMILIES)


def main(work: Path) -> None:
    selection = {  # "sophon: λ = 10" or "sophon: λ = 10 (given)"
        method: value.split()[0]
        for method, value in (
            line.split(": λ = ") for line in (work / "selection.txt").read_text().splitlines()
        )
    }
    runs = []
    for card_dir in sorted((work / "cards").glob("*-s[0-9]*")):
        if card_dir.suffix or not (card_dir / "card.json").is_file():
            continue
        method, seed = re.fullmatch(r"(.+)-s(\d+)", card_dir.name).groups()
        fit = f"{method}-s{seed}" if method == "ours" else f"{method}-λ{selection[method]}-s{seed}"
        run_dir = work / "fits" / fit / "lightning_logs" / "version_0"
        label = method if method == "ours" else f"{method} (λ {selection[method]})"
        runs.append(load_card_run(label, int(seed), card_dir, run_dir))
        dest = HERE / "cards" / card_dir.name
        collect_card(card_dir, run_dir, dest)
        objective = work / "fits" / fit / "objective.yaml"
        if objective.is_file():
            shutil.copy2(objective, dest / "objective.yaml")
    runs.sort(key=lambda r: (ORDER.index(r.method.split(" ")[0]), r.seed))
    card = max(runs, key=lambda r: len(r.card["resistance"])).card  # θ_0, scratch: all alike
    goal = largest_advantage_budget(card)
    parts = []
    for budget in card["resistance"]:
        gap = reference_advantage(card, budget)
        title = f"## n = {budget} harmful images: θ_0's head start over scratch {gap:.3f}"
        title += " (the largest: the goal is judged here)" if budget == goal else ""
        parts.append(title + "\n\n" + comparison_markdown(runs, budget, FAMILIES))
        parts.append("Per run, advantage removed against θ_0 with its 90 % interval:\n")
        parts.append(runs_markdown(runs, budget, FAMILIES))
        if any(r.family(f, budget) and "control" in r.family(f, budget)
               for r in runs for f in GOAL_FAMILIES):  # fmt: skip
            parts.append("Per run, against the control of its seed (the same fit, λ = 0):\n")
            parts.append(runs_markdown(runs, budget, GOAL_FAMILIES, "advantage_removed_control"))
            ceiling = [removed_cell(card["resistance"][budget].get(f), "head_start_in_blocks")
                       for f in GOAL_FAMILIES]  # fmt: skip
            parts.append(
                "The ceiling (θ_0 with `layer3` + `layer4` from scratch): θ_0's head start held "
                "by those blocks, "
                + ", ".join(f"`{f}` {c}" for f, c in zip(GOAL_FAMILIES, ceiling, strict=True))
                + ".\n"
            )
    text = "\n".join(parts)
    (HERE / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
