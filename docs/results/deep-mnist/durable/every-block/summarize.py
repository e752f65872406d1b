"""Collect run.sh's selection fits and cards into this folder and write screen.md.

python docs/results/deep-mnist/durable/every-block/summarize.py WORK_DIR

screen.md: the D_P rule's selection (every λ fitted, seed 1), then each carded run's advantage
removed against θ_0 and against its control, and the screen's score (PROTOCOL.md: the smallest
advantage removed over the three fine-tuning families at the goal's budget); once a candidate
has confirmation cards (seeds 2 and 3), its seeds side by side and how many meet the goal.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lightning_immunize.attacks.comparison import (
    GOAL_FAMILIES,
    CardRun,
    collect_card,
    comparison_markdown,
    load_card_run,
    runs_markdown,
)
from lightning_immunize.attacks.durability import read_trials
from lightning_immunize.attacks.sweep import CONFIRM_NAME, TRIALS_NAME

HERE = Path(__file__).resolve().parent
FAMILIES = ("probe", *GOAL_FAMILIES)
#: PROTOCOL.md: the goal's budget is where θ_0's head start over scratch against
#: `finetune-all` is largest.
BUDGET_FAMILY = "finetune-all"


def goal_budget(card: dict) -> str:
    """The data budget where θ_0 is furthest ahead of scratch against ``finetune-all``."""
    gaps = {
        budget: entry["reference"]["mean"] - entry["scratch"]["mean"]
        for budget, families in card["resistance"].items()
        if (entry := families.get(BUDGET_FAMILY)) and "scratch" in entry
    }
    return max(gaps, key=gaps.get)


def read_selection(work: Path) -> dict[str, str]:
    """``{candidate: λ}`` from run.sh's ``selection.txt`` (``"none"`` when no λ passes), the
    last line of a candidate winning (its second round)."""
    kept: dict[str, str] = {}
    for line in (work / "selection.txt").read_text().splitlines():
        candidate, rest = line.split(": λ = ")
        kept[candidate] = rest.split()[0]
    return kept


def selection_markdown(work: Path, kept: dict[str, str]) -> str:
    """Every selection fit of seed 1: candidate, λ, D_P held-out accuracy and its change,
    RIR, wall time, and the λ the rule kept (``kept``, :func:`read_selection`)."""
    lines = [
        "| candidate | λ | D_P held-out | change (points) | RIR | fit (s) | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for candidate in kept:
        fits = []
        for fit in (work / "fits").glob(f"{candidate}-λ*-s1"):
            lam = re.fullmatch(rf"{re.escape(candidate)}-λ(.+)-s1", fit.name).group(1)
            result = fit / "lightning_logs" / "version_0" / "immunization.json"
            if result.is_file() and (fit / "done").is_file():
                fits.append((float(lam), lam, json.loads(result.read_text()), fit))
        for _, lam, d, fit in sorted(fits):
            change = 100 * (d["task_metric"] - d["task_metric_before"])
            lines.append(
                f"| `{candidate}` | {lam} | {100 * d['task_metric']:.2f} % | {change:+.2f} | "
                f"{d['rir']:.3g} | {(fit / 'done').read_text().strip()} | "
                f"{'**kept**' if lam == kept[candidate] else ''} |"
            )
        if kept[candidate] == "none":
            lines.append(f"| `{candidate}` | — | | | | | none passes: not carded |")
    return "\n".join(lines) + "\n"


def screen_score(run: CardRun, budget: str) -> float | None:
    """The smallest advantage removed over the fine-tuning families (``None`` if one is
    undefined)."""
    values = [(run.family(f, budget) or {}).get("advantage_removed") for f in GOAL_FAMILIES]
    return None if any(v is None for v in values) else min(values)


def _resistance_rows(path: Path, budget: str, model: str) -> list[dict[str, str]]:
    """The rows of a card's ``trials.csv`` / ``confirm.csv`` for one model's resistance
    studies at ``budget``."""
    return [
        r for r in read_trials(path)
        if (r["condition"], r["data_budget"], r["model"]) == ("resistance", budget, model)
    ]  # fmt: skip


def batchnorm_markdown(cards: dict[str, Path], budget: str) -> str:
    """Which BatchNorm the attacker chose, per card and family at ``budget``: the worst case's
    mode (``confirm.csv``) and the best selection score of an unpruned trial with each mode
    (``trials.csv``: ``recalibrate`` re-estimates the statistics on the harmful images, ``keep``
    uses D_P's). θ_0's row comes from the first card (its searches are shared)."""
    header = "| model | " + " | ".join(f"`{f}`" for f in FAMILIES) + " |"
    lines = [header, "|---|" + "---|" * len(FAMILIES)]
    rows = [("θ_0", "reference", next(iter(cards.values())))]
    rows += [(label, "immunized", card_dir) for label, card_dir in cards.items()]
    for label, model, card_dir in rows:
        chosen: dict[str, set[str]] = {}
        for r in _resistance_rows(card_dir / CONFIRM_NAME, budget, model):
            chosen.setdefault(r["family"], set()).add(r["batchnorm"])
        best: dict[tuple[str, str], float] = {}
        for r in _resistance_rows(card_dir / TRIALS_NAME, budget, model):
            if not r["pruned_at"] and not r["diverged_at"]:
                key = (r["family"], r["batchnorm"])
                best[key] = max(best.get(key, 0.0), float(r["objective"]))
        cells = []
        for family in FAMILIES:
            scores = " / ".join(
                f"{best[(family, mode)]:.2f}" if (family, mode) in best else "—"
                for mode in ("recalibrate", "keep")
            )
            cells.append(f"{'/'.join(sorted(chosen.get(family, {'—'})))} ({scores})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(work: Path) -> None:
    selected = read_selection(work)
    runs, card_dirs = [], {}
    for card_dir in sorted((work / "cards").glob("*-s[0-9]*")):
        if card_dir.suffix or not (card_dir / "card.json").is_file():
            continue
        candidate, seed = re.fullmatch(r"(.+)-s(\d+)", card_dir.name).groups()
        run_dir = work / "fits" / f"{candidate}-λ{selected[candidate]}-s{seed}"
        run_dir = run_dir / "lightning_logs" / "version_0"
        runs.append(load_card_run(f"`{candidate}` (λ {selected[candidate]})", int(seed),
                                  card_dir, run_dir))  # fmt: skip
        collect_card(card_dir, run_dir, HERE / "cards" / card_dir.name)
        card_dirs[f"`{candidate}` s{seed}"] = card_dir
    parts = ["## Selection: λ by the D_P rule, seed 1\n", selection_markdown(work, selected)]
    if runs:
        budget = goal_budget(runs[0].card)
        parts.append(f"## The screen at the goal's budget, n = {budget}\n")
        parts.append("Advantage removed against θ_0, with its 90 % interval:\n")
        parts.append(runs_markdown(runs, budget, FAMILIES))
        parts.append("Against the control (the same fit with λ = 0):\n")
        parts.append(runs_markdown(runs, budget, GOAL_FAMILIES, "advantage_removed_control"))
        scores = [(screen_score(r, budget), r) for r in runs if r.seed == 1]
        ranked = sorted(scores, key=lambda s: float("-inf") if s[0] is None else s[0],
                        reverse=True)  # fmt: skip
        parts.append("Screen score (smallest advantage removed over the fine-tuning families):\n")
        parts.append("| rank | candidate | score |\n|---|---|---|")
        parts.append("\n".join(
            f"| {i} | {r.method} | {'—' if s is None else f'{s:.2f}'} |"
            for i, (s, r) in enumerate(ranked, 1)
        ) + "\n")  # fmt: skip
        parts.append(
            "The attacker's BatchNorm at the goal's budget: the worst case's choice "
            "(`recalibrate`: statistics re-estimated on the harmful images; `keep`: D_P's), and in "
            "brackets the best selection score of an unpruned search trial with each "
            "(recalibrate / keep):\n"
        )
        parts.append(batchnorm_markdown(card_dirs, budget))
        confirmed = {r.method for r in runs if r.seed > 1}
        if confirmed:
            parts.append(f"## The confirmation: seeds 1–3 at n = {budget}\n")
            parts.append(
                "Per candidate, mean ± sd over its carded seeds (advantage removed against θ_0), "
                "and the runs that meet the goal:\n"
            )
            parts.append(comparison_markdown([r for r in runs if r.method in confirmed],
                                             budget, FAMILIES))  # fmt: skip
        for other in (b for b in runs[0].card["resistance"] if b != budget):
            parts.append(f"## n = {other}\n")
            parts.append(runs_markdown(runs, other, FAMILIES))
    text = "\n".join(parts)
    (HERE / "screen.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
