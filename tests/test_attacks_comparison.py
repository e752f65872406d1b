"""Comparing methods from their cards: the goal rule and the tables."""

from __future__ import annotations

import json

import pytest

from lightning_immunize.attacks.comparison import (
    CARD_FILES,
    CardRun,
    collect_card,
    comparison_markdown,
    goal_met,
    largest_advantage_budget,
    load_card_run,
    reference_advantage,
    removed_cell,
    runs_markdown,
    trainability_kept,
)

MARKS = [1, 3, 10, 30, 100, 300]


def _entry(immunized: list[float], removed: float | None) -> dict:
    return {
        "immunized": {"worst_case": immunized},
        "reference": {"worst_case": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]},
        "scratch": {"worst_case": [0.2, 0.2, 0.3, 0.4, 0.5, 0.8]},
        "advantage_removed": removed,
    }


def _run(method: str, seed: int, removed: dict[str, float | None], after: float = 0.985):
    families = {f: _entry([0.2 + 0.1 * seed] * 6, r) for f, r in removed.items()}
    card = {"marks": MARKS, "metrics": {"resistance": "accuracy"},
            "resistance": {"100": families}}  # fmt: skip
    immunization = {"rir": 2.0 + seed, "task_metric": after, "task_metric_before": 0.99,
                    "seconds": 60.0}  # fmt: skip
    return CardRun(method, seed, card, immunization)


ALL = ("finetune-immunized", "finetune-all", "lora")


def test_the_goal_needs_every_finetuning_family_and_d_p_within_one_point():
    assert goal_met(_run("m", 1, dict.fromkeys(ALL, 0.85)), "100")
    assert not goal_met(_run("m", 1, dict.fromkeys(ALL, 0.85), after=0.979), "100")
    assert goal_met(_run("m", 1, dict.fromkeys(ALL, 0.85), after=0.981), "100")
    assert not goal_met(_run("m", 1, {**dict.fromkeys(ALL, 0.9), "lora": 0.79}), "100")
    assert not goal_met(_run("m", 1, {**dict.fromkeys(ALL, 0.9), "lora": None}), "100")
    assert not goal_met(_run("m", 1, {"finetune-all": 0.9}), "100")  # families missing
    assert not goal_met(_run("m", 1, dict.fromkeys(ALL, 0.9)), "128")  # another budget


def _with(run: CardRun, interval=None, trainability=None) -> CardRun:
    card = json.loads(json.dumps(run.card))
    if interval is not None:
        for entry in card["resistance"]["100"].values():
            entry["advantage_removed_interval"] = interval
    if trainability is not None:
        card["trainability"] = {"100": {"probe": trainability}}
    return CardRun(run.method, run.seed, card, run.immunization)


def test_the_goal_needs_each_interval_above_one_half_and_trainability_kept():
    run = _run("m", 1, dict.fromkeys(ALL, 0.85))
    assert goal_met(_with(run, interval=[0.6, 1.1]), "100")
    assert not goal_met(_with(run, interval=[0.5, 1.1]), "100")  # the floor is exclusive
    assert not goal_met(_with(run, interval=[-0.2, 1.9]), "100")  # a wide interval: not met
    easy = {"advantage_removed": 0.1, "advantage_removed_interval": [-0.2, 0.3]}
    ruined = {"advantage_removed": 0.9, "advantage_removed_interval": [0.6, 1.2]}
    assert trainability_kept(run) is None
    assert trainability_kept(_with(run, trainability=easy)) is True
    assert goal_met(_with(run, interval=[0.6, 1.1], trainability=easy), "100")
    assert trainability_kept(_with(run, trainability=ruined)) is False
    assert not goal_met(_with(run, interval=[0.6, 1.1], trainability=ruined), "100")


def test_a_cell_says_no_measurable_effect_when_its_interval_holds_zero():
    assert (
        removed_cell({"advantage_removed": 0.02, "advantage_removed_interval": [-0.07, 0.09]})
        == "no measurable effect (0.02 [-0.07, 0.09])"
    )
    assert (
        removed_cell({"advantage_removed": 0.15, "advantage_removed_interval": [0.09, 0.22]})
        == "**0.15 [0.09, 0.22]**"
    )
    assert removed_cell({"advantage_removed": None}) == "—" and removed_cell(None) == "—"
    assert removed_cell({"advantage_removed": 0.3}) == "0.30"  # a card without intervals
    runs = [_with(_run("a", 1, dict.fromkeys(ALL, 0.9)), interval=[0.7, 1.0]),
            _with(_run("a", 2, dict.fromkeys(ALL, 0.1)), interval=[-0.1, 0.3])]  # fmt: skip
    text = runs_markdown(runs, "100", ALL)
    assert "| a | 1 | -0.50 | **0.90 [0.70, 1.00]** |" in text and text.rstrip().endswith("| no |")
    assert "| not measured | yes |" in text


def test_the_tables_give_each_method_over_its_seeds_against_theta_0_and_scratch():
    runs = [
        _run("a", 1, dict.fromkeys(ALL, 0.9)),
        _run("a", 2, dict.fromkeys(ALL, 0.1)),
        _run("b", 1, dict.fromkeys(ALL, -0.2), after=0.9),
    ]
    text = comparison_markdown(runs, "100", ALL)
    assert "| a | 1, 2 | -0.50 ± 0.00 | 3.50 ± 0.71 | 60 ± 0 | 0.50 ± 0.57 |" in text
    assert text.count("| 1/2 |") == 1 and "| b | 1 | -9.00 | 3.00 | 60 |" in text
    assert "| `lora` | θ_0 | 0.800 | 0.900 | 0.950 |" in text
    assert "| `lora` | scratch | 0.400 | 0.500 | 0.800 |" in text
    assert "| `lora` | a | 0.350 | 0.350 | 0.350 |" in text  # mean of 0.3 and 0.4
    with pytest.raises(ValueError, match="no runs"):
        comparison_markdown([], "100", ALL)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "card.json").write_text(json.dumps({"marks": MARKS}))
    with pytest.raises(FileNotFoundError, match="run/immunization.json does not exist"):
        load_card_run("m", 1, tmp_path / "card", tmp_path / "run")


def test_collect_card_keeps_the_card_files_and_the_run_result_and_names_a_missing_one(tmp_path):
    card, run, dest = tmp_path / "card", tmp_path / "run", tmp_path / "docs" / "ours-s1"
    card.mkdir()
    run.mkdir()
    for name in ("card.json", "card.md", "trials.csv", "card.log"):
        (card / name).write_text(name)
    with pytest.raises(FileNotFoundError, match="run/immunization.json does not exist"):
        collect_card(card, run, dest)
    assert not dest.exists()
    (run / "immunization.json").write_text("{}")
    collect_card(card, run, dest)
    kept = sorted(p.name for p in dest.iterdir())
    assert kept == ["card.json", "card.md", "immunization.json", "trials.csv"]
    assert set(kept) - {"immunization.json"} <= set(CARD_FILES)
    assert (dest / "card.md").read_text() == "card.md"


def test_the_goal_budget_is_where_theta_0_leads_scratch_most():
    def entry(ref: float, scratch: float) -> dict:
        return {"reference": {"mean": ref}, "scratch": {"mean": scratch}}

    card = {"resistance": {
        "20": {f: entry(0.7, 0.3) for f in ALL},
        "100": {**{f: entry(0.8, 0.5) for f in ALL}, "lora": entry(0.8, 0.1)},
        "all": {f: entry(0.9, 0.85) for f in ALL if f != "lora"},
    }}  # fmt: skip
    assert reference_advantage(card, "20") == pytest.approx(0.4)
    assert reference_advantage(card, "100") == pytest.approx((0.3 + 0.3 + 0.7) / 3)
    assert reference_advantage(card, "all") is None  # lora missing
    assert largest_advantage_budget(card) == "100"
    assert largest_advantage_budget(card, ["finetune-all"]) == "20"
    with pytest.raises(ValueError, match="no data budget of the card has every family"):
        largest_advantage_budget({"resistance": {"all": card["resistance"]["all"]}})
