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
    comparison_markdown,
    largest_advantage_budget,
    load_card_run,
    reference_advantage,
)

HERE = Path(__file__).resolve().parent
KEEP = ("card.md", "card.json", "trials.csv", "effort.png", "search.png")
ORDER = ("ours", "sophon", "tar", "ours_sa")
FAMILIES = ("probe", *GOAL_FAMILIES)


def main(work: Path) -> None:
    selection = dict(
        line.split(": λ = ") for line in (work / "selection.txt").read_text().splitlines()
    )
    runs = []
    for card_dir in sorted((work / "cards").glob("*-s[0-9]*")):
        if not (card_dir / "card.json").is_file():
            continue
        method, seed = re.fullmatch(r"(.+)-s(\d+)", card_dir.name).groups()
        fit = f"{method}-s{seed}" if method == "ours" else f"{method}-λ{selection[method]}-s{seed}"
        run_dir = work / "fits" / fit / "lightning_logs" / "version_0"
        label = method if method == "ours" else f"{method} (λ {selection[method]})"
        runs.append(load_card_run(label, int(seed), card_dir, run_dir))
        dest = HERE / "cards" / card_dir.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            shutil.copy2(card_dir / name, dest / name)
        shutil.copy2(run_dir / "immunization.json", dest / "immunization.json")
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
    text = "\n".join(parts)
    (HERE / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
