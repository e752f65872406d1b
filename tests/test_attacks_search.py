"""The durability card's instrument (issue 24): BatchNorm as the attacker's choice, a search
whose design is shared within a study and differs between studies, pruning, the selection
and scoring splits, the worst case's re-runs and intervals, the ceiling model, a family added
from outside the package, and several workers on one storage."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from support.attack_models import tiny_backbone, tiny_images, tiny_models

from lightning_immunize.attacks.attacker import AttackData, Attacker
from lightning_immunize.attacks.budgets import Budget, SearchSpace, load_budgets
from lightning_immunize.attacks.card import build_card, card_markdown
from lightning_immunize.attacks.durability import durability_card, read_trials
from lightning_immunize.attacks.families import (
    AttackerFamily,
    Prepared,
    get_family,
    register_family,
    unregister_family,
)
from lightning_immunize.attacks.families.preparation import (
    recalibrate_batchnorm,
    split_frozen_prefix,
)
from lightning_immunize.attacks.intervals import bootstrap_means, ratio_interval
from lightning_immunize.attacks.search import (
    FinishedTrialsHalving,
    group_seed,
    startup_design,
    worst_case_search,
)
from lightning_immunize.attacks.sweep import CEILING_IS_SCRATCH, AttackTasks, plan_studies
from lightning_immunize.attacks.tasks import attack_tasks, ceiling_weights, random_weights
from lightning_immunize.attacks.training import run_attack

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return tiny_images(n, seed, scale=3.0, shift=shift)


def _data(n_train: int = 48) -> AttackData:
    return AttackData("harmful", *_images(n_train, 1), *_images(30, 2), "multiclass", 3,
                      *_images(30, 3))  # fmt: skip


def _budget(trials: int = 3, **kwargs) -> Budget:
    space = SearchSpace(batch_sizes=(8, 16), startup_trials=kwargs.pop("startup", 2),
                        reduction_factor=kwargs.pop("reduction_factor", 3))  # fmt: skip
    return Budget(name="tiny", trials=trials, horizon=kwargs.pop("horizon", 3),
                  data_budgets=kwargs.pop("data_budgets", (None,)),
                  families={"deep": kwargs.pop("families", ("probe",)), "linear": ("probe",)},
                  space=space, reseeds=kwargs.pop("reseeds", 2), **kwargs)  # fmt: skip


def _models() -> dict[str, torch.nn.Module]:
    return tiny_models(ceiling=True)


# ------------------------------------------------------------------------- BatchNorm


def test_the_scratch_models_batchnorm_is_calibrated_when_the_attacker_chooses_so():
    scratch = random_weights(tiny_backbone(0))
    x, _ = _images(64, 5, shift=4.0)
    stem_bn = scratch.model.bn1  # frozen (only layer4 trains): TimmBackbone keeps it in eval
    assert float(stem_bn.running_mean.abs().max()) == 0.0
    recalibrated = recalibrate_batchnorm(_copy(scratch), x)
    with torch.no_grad():
        stem = recalibrated.model.conv1(x)
    expected = stem.mean(dim=(0, 2, 3))
    assert torch.allclose(recalibrated.model.bn1.running_mean, expected, rtol=1e-3, atol=1e-4)
    assert not recalibrated.model.bn1.training  # modes restored
    # Through an attack: "recalibrate" changes the features, "keep" leaves the model's own.
    data = _data()
    kept = run_attack(scratch, data, Attacker("probe", "adamw", 1e-2, 16, 3, batchnorm="keep"))
    recal = run_attack(scratch, data, Attacker("probe", "adamw", 1e-2, 16, 3,
                                               batchnorm="recalibrate"))  # fmt: skip
    assert kept.scores != recal.scores
    assert float(scratch.model.bn1.running_mean.abs().max()) == 0.0  # the model is untouched


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_the_search_offers_batchnorm_only_to_models_that_have_it():
    space = SearchSpace()
    assert "batchnorm" in startup_design("probe", space, True, 0, 2)[0]
    assert "batchnorm" not in startup_design("probe", space, False, 0, 2)[0]
    assert startup_design("gd-exact", space, True, 0, 8) == [
        {"batchnorm": "keep"}, {"batchnorm": "recalibrate"}
    ]  # fmt: skip


# ------------------------------------------------------------------------- the search


def test_models_of_a_study_share_configurations_and_other_studies_draw_others(tmp_path):
    models = _models()
    budget = _budget(trials=4, families=("probe", "finetune-immunized"), startup=4)
    durability_card(models, AttackTasks(_data()), budget, tmp_path, progress=False)
    rows = read_trials(tmp_path / "trials.csv")
    keys = ("optimizer", "lr", "weight_decay", "schedule", "batch_size", "batchnorm")

    def configs(family: str, model: str) -> list[tuple]:
        return [tuple(r[k] for k in keys) for r in rows
                if r["family"] == family and r["model"] == model]  # fmt: skip

    for family in ("probe", "finetune-immunized"):
        assert configs(family, "immunized") == configs(family, "reference")
        assert configs(family, "immunized") == configs(family, "scratch")
        assert len(set(configs(family, "immunized"))) == 4  # 4 distinct configurations
    assert not set(configs("probe", "immunized")) & set(configs("finetune-immunized", "immunized"))
    assert group_seed(0, "resistance/n=all/probe") != group_seed(0, "resistance/n=all/lora")
    # The ceiling is searched for the network families only.
    assert configs("probe", "ceiling") == []
    assert configs("finetune-immunized", "ceiling") == configs("finetune-immunized", "immunized")


def test_the_standard_budget_searches_both_optimizers_over_their_ranges():
    budget = load_budgets()["standard"]
    design = startup_design("finetune-all", budget.space, True, group_seed(0, "x"), 8)
    assert budget.trials >= 16 and budget.reseeds >= 3
    assert {d["optimizer"] for d in design} == {"sgd", "adamw"}
    assert {d["schedule"] for d in design} == {"constant", "warmup-cosine"}
    for d in design:
        low, high = budget.space.lr_range(d["optimizer"])
        assert low <= d[f"lr_{d['optimizer']}"] <= high
        assert 1e-6 <= d["weight_decay"] <= 0.1
    assert budget.space.lr_range("adamw") == (1e-5, 1e-2)
    assert budget.space.lr_range("sgd") == (1e-4, 1.0)


def test_a_hopeless_configuration_is_pruned_at_a_step_mark(tmp_path):
    """Scores fall with the trial index: from the 4th trial on, each is worse than the three
    before it at step 10 and is stopped there (its later marks never run)."""
    seen: list[int] = []

    def attack(attacker, report):
        from lightning_immunize.attacks.attacker import AttackResult

        index = len(seen)
        seen.append(index)
        scores = []
        for j, _ in enumerate(attacker.marks):
            scores.append(1.0 - 0.1 * index)
            if j < len(attacker.marks) - 1 and report(j, scores[-1]):
                return AttackResult(attacker.marks, scores, 0.0, pruned_at=attacker.marks[j])
        return AttackResult(attacker.marks, scores, 0.0)

    url = f"sqlite:///{tmp_path / 's.db'}"
    records = worst_case_search(url, "s", attack, SearchSpace(startup_trials=2), "probe", 100,
                                6, True, group="g")  # fmt: skip
    assert [r.pruned for r in records] == [False, False, False, True, True, True]
    assert all(r.result.pruned_at == 10 for r in records if r.pruned)
    assert all(len(r.result.scores) == 3 for r in records if r.pruned)  # marks 1, 3, 10
    study = optuna.load_study(study_name="s", storage=url)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 3 + ["PRUNED"] * 3


def test_halving_never_stops_before_its_first_mark_and_keeps_the_best_share():
    halving = FinishedTrialsHalving(3)
    assert halving.keep(0.1, [0.9, 0.8], True)  # fewer than η finished trials: keep
    assert not halving.keep(0.1, [0.9, 0.8, 0.7], True)
    assert halving.keep(0.1, [0.9, 0.8, 0.7], False)  # MSE: lower is better
    assert not halving.should_stop(1, -1.0, [], True)


# ------------------------------------------------------------------------- splits, worst case


def test_selection_and_scoring_splits_are_disjoint_and_use_every_held_out_sample():
    class Halves:
        task = "multiclass"
        num_classes_harmful = num_classes_pretrain = 3
        withheld_harmful = None

        def setup(self, stage):
            pass

        def full_tensors(self, split):
            n = 60 if split == "train" else 41
            base = 0 if split == "train" else 1000
            x = (torch.arange(n).float() + base).view(n, 1)
            y = torch.arange(n) % 3
            return x, y, x + 10_000, y

    tasks = attack_tasks(Halves(), eval_samples=None, seed=0, unseen_samples=11)
    h = tasks.harmful
    select = set(h.eval_x.view(-1).tolist())
    score = set(h.score_x.view(-1).tolist())
    unseen = set(tasks.harmful_unseen.train_x.view(-1).tolist())
    assert not select & score and not select & unseen and not score & unseen
    assert len(select) + len(score) + len(unseen) == 41  # every held-out D_H sample used
    assert len(unseen) == 11
    b = tasks.benign
    assert not set(b.eval_x.view(-1).tolist()) & set(b.score_x.view(-1).tolist())
    assert len(b.eval_x) + len(b.score_x) == 41


def test_the_worst_case_is_reruns_of_the_best_configuration_scored_apart(tmp_path):
    models = _models()
    data = _data()
    budget = _budget(trials=3, reseeds=3, data_budgets=(32,), families=("finetune-immunized",))
    card = durability_card(models, AttackTasks(data), budget, tmp_path, progress=False)
    trials = read_trials(tmp_path / "trials.csv")
    reruns = read_trials(tmp_path / "confirm.csv")
    for model in ("immunized", "reference", "scratch", "ceiling"):
        mine = [r for r in reruns if r["model"] == model]
        assert len(mine) == 3
        searched = [r for r in trials if r["model"] == model and not r["pruned_at"]]
        best = max(searched, key=lambda r: float(r["objective"]))
        keys = ("optimizer", "lr", "weight_decay", "schedule", "batch_size", "batchnorm")
        assert all(tuple(r[k] for k in keys) == tuple(best[k] for k in keys) for r in mine)
        assert len({r["seed"] for r in mine}) == 3
        assert not {r["seed"] for r in mine} & {r["seed"] for r in trials}
        entry = card["resistance"]["32"]["finetune-immunized"][model]
        a_runs = [np.mean([float(r[f"at_{m}"]) for m in card["marks"]]) for r in mine]
        assert entry["mean"] == pytest.approx(np.mean(a_runs))
        assert entry["mean_sd"] == pytest.approx(np.std(a_runs, ddof=1))
        assert entry["final"] == pytest.approx(np.mean([float(r["at_3"]) for r in mine]))
    # Paired re-runs: the same seeds for every model.
    seeds = {m: sorted(r["seed"] for r in reruns if r["model"] == m) for m in models}
    assert len({tuple(s) for s in seeds.values()}) == 1
    text = (tmp_path / "card.md").read_text()
    assert "re-run 3 times with fresh attacker seeds" in text
    assert "scoring* split that no selection used" in text


def test_reruns_redraw_the_attackers_data_subset():
    data = _data(n_train=48)
    budget = _budget(data_budgets=(16,))
    studies = plan_studies(_models(), AttackTasks(data), budget, ["probe"])
    study = studies[0]
    subsets = [study.rerun_data(r, 0).train_x for r in range(3)]
    assert not torch.equal(subsets[0], subsets[1]) and not torch.equal(subsets[1], subsets[2])
    other = next(s for s in studies if s.model != study.model)
    assert torch.equal(other.rerun_data(1, 0).train_x, subsets[1])  # paired across models


def _probe_card(condition: str, values: dict[str, np.ndarray]) -> dict:
    """A card of one `probe` study per model at marks 1 and 3: ``values[model]`` (3 re-runs ×
    samples) of 0/1 scores, each re-run scoring its mean at both marks."""
    rows, confirms, samples = [], [], {}
    for model, v in values.items():
        base = {"condition": condition, "data_budget": "all", "model": model,
                "family": "probe", "objective": "0.5", "pruned_at": ""}  # fmt: skip
        rows.append({**base, "trial": "0", "at_1": "0.5", "at_3": "0.5"})
        for r in range(len(v)):
            score = str(v[r].mean())
            confirms.append({**base, "trial": str(r), "at_1": score, "at_3": score})
        samples[(condition, "all", "probe", model)] = v
    return build_card(rows, {condition: "accuracy"}, confirm_rows=confirms, samples=samples)


def test_bootstrap_intervals_cover_the_estimate_and_say_no_measurable_effect():
    rng = np.random.default_rng(0)
    ref = rng.binomial(1, 0.8, (3, 400)).astype(float)
    scratch = rng.binomial(1, 0.3, (3, 400)).astype(float)
    imm_same = rng.binomial(1, 0.8, (3, 400)).astype(float)
    imm_low = rng.binomial(1, 0.4, (3, 400)).astype(float)
    boot = bootstrap_means({"r": ref, "s": scratch, "a": imm_same, "b": imm_low})
    same = ratio_interval(boot["r"], boot["a"], boot["r"], boot["s"])
    low = ratio_interval(boot["r"], boot["b"], boot["r"], boot["s"])
    assert same[0] < 0 < same[1]
    assert 0 < low[0] < (0.8 - 0.4) / (0.8 - 0.3) < low[1]
    # The card's text: an interval that contains 0 is no measurable effect.
    card = _probe_card("resistance", {"reference": ref, "scratch": scratch, "immunized": imm_same})
    entry = card["resistance"]["all"]["probe"]
    low_, high_ = entry["advantage_removed_interval"]
    assert low_ <= entry["advantage_removed"] <= high_
    assert "no measurable effect" in entry["sentence"]
    assert "no measurable effect" in card_markdown(card)
    assert card["marks"] == [1, 3]


@pytest.mark.parametrize(
    ("p_reference", "p_immunized", "word", "side"),
    [
        # the same steps to the target as θ_0, a lower score at every mark, interval above 0:
        # the card once said "as easy as on θ_0" beside "advantage removed 0.54 [0.33, 0.85]"
        (0.95, 0.9, "**harder**", 0),
        # fewer steps and an interval below 0: once "as easy as" beside "-0.30 [-0.51, -0.18]"
        (0.8, 0.95, "**easier**", 1),
    ],
)
def test_a_benign_task_measurably_slower_or_faster_is_not_called_as_easy(
    p_reference: float, p_immunized: float, word: str, side: int
):
    rng = np.random.default_rng(0)
    values = {m: rng.binomial(1, p, (3, 400)).astype(float)
              for m, p in (("reference", p_reference), ("scratch", 0.3),
                           ("immunized", p_immunized))}  # fmt: skip
    card = _probe_card("trainability", values)
    entry = card["trainability"]["all"]["probe"]
    assert entry["immunized"]["steps_to_target"] <= entry["reference"]["steps_to_target"]
    low, high = entry["advantage_removed_interval"]
    assert (low > 0) if side == 0 else (high < 0)
    assert "as easy" not in entry["sentence"] and word in entry["sentence"]


# ------------------------------------------------------------------------- models


def test_the_ceiling_is_theta0_with_the_immunized_blocks_from_scratch():
    models = _models()
    ceiling, reference, scratch = models["ceiling"], models["reference"], models["scratch"]
    ceiling_state = ceiling.state_dict()
    for name in reference.state_dict():
        source = scratch if name.startswith("model.layer4.") else reference
        assert torch.equal(ceiling_state[name], source.state_dict()[name]), name
    trainable = {n for n, p in ceiling.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad}


def test_with_every_block_immunized_the_ceiling_is_scratch_and_is_not_searched_twice():
    reference = tiny_backbone(0)
    for p in reference.parameters():
        p.requires_grad_(True)
    immunized = _copy(reference)
    scratch = random_weights(reference)
    models = {"immunized": immunized, "reference": reference, "scratch": scratch,
              "ceiling": ceiling_weights(reference, scratch, immunized)}  # fmt: skip
    notes: list[str] = []
    budget = _budget(families=("probe", "finetune-all"))
    studies = plan_studies(models, AttackTasks(_data()), budget, budget.families["deep"], notes)
    assert {s.model for s in studies} == {"immunized", "reference", "scratch"}
    assert CEILING_IS_SCRATCH in notes
    # With only layer4 immunized the ceiling differs from scratch and is searched.
    partial = plan_studies(_models(), AttackTasks(_data()), budget, budget.families["deep"])
    assert "ceiling" in {s.model for s in partial}


def test_the_frozen_prefix_is_computed_once_and_changes_nothing():
    model = tiny_backbone(0)
    x, _ = _images(8, 4)
    prefix, rest = split_frozen_prefix(model, x[:2])
    assert not any(p.requires_grad for p in prefix.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.allclose(rest(prefix(x)), model(x), atol=1e-6)
    data = _data()
    attacker = Attacker("finetune-immunized", "sgd", 0.05, 16, 10, seed=2, batchnorm="keep")
    cache: dict = {}
    first = run_attack(model, data, attacker, cache)
    assert any(k[0] == "prefix" for k in cache)
    again = run_attack(model, data, attacker, cache)
    assert again.scores == first.scores


# ------------------------------------------------------------------------- a new family


@register_family
class _HeadOnLogitsOfNoise(AttackerFamily):
    """A family defined in a test: a probe on fixed random projections of the features."""

    name = "test-random-projection"

    def prepare(self, extractor, data, attacker, cache):
        from lightning_immunize.attacks.families.preparation import cached_features

        z_train, z_eval, z_score = cached_features(extractor, data, attacker.batchnorm, cache)
        proj = torch.randn(z_train.shape[1], 4, generator=torch.Generator().manual_seed(0))
        score = None if z_score is None else z_score @ proj
        return Prepared(torch.nn.Identity(), z_train @ proj, z_eval @ proj, score)


def test_a_family_registered_in_a_test_file_runs_end_to_end(tmp_path):
    try:
        budget = _budget(trials=2, families=("test-random-projection",))
        card = durability_card(_models(), AttackTasks(_data()), budget, tmp_path, progress=False)
        entry = card["resistance"]["all"]["test-random-projection"]
        assert {"immunized", "reference", "scratch"} <= set(entry)
        assert "test-random-projection" in (tmp_path / "card.md").read_text()
        assert get_family("test-random-projection").network is False
    finally:
        unregister_family("test-random-projection")
    register_family(_HeadOnLogitsOfNoise)  # the module's other tests may need it again


# ------------------------------------------------------------------------- several workers

WORKER = textwrap.dedent(
    """
    import sys, json
    sys.path.insert(0, {tests!r})
    import torch
    from test_attacks_search import _models, _data, _budget
    from lightning_immunize.attacks.durability import durability_card
    from lightning_immunize.attacks.sweep import AttackTasks
    torch.set_num_threads(1)
    out, url = sys.argv[1], sys.argv[2]
    durability_card(_models(), AttackTasks(_data()), _budget(trials=3, families=("probe",
                    "finetune-immunized")), out, storage=url, progress=False)
    """
)


@pytest.mark.slow
def test_two_workers_on_one_storage_share_the_work_and_write_the_card_of_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    url = f"sqlite:///{tmp_path / 'new.db'}"  # created by both at once
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"w{i}"), url],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    storage = optuna.storages.RDBStorage(url)
    ran = 0
    for summary in optuna.get_all_study_summaries(storage):
        if summary.study_name.startswith("claims/"):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        numbers = [t.user_attrs["index"] for t in study.trials]
        assert len(numbers) == len(set(numbers)), summary.study_name  # nothing ran twice
        ran += len(numbers)
    studies = 3 + 4  # probe: 3 models; finetune-immunized: and the ceiling
    assert ran == studies * (3 + 2)
    cards = [json.loads((tmp_path / f"w{i}" / "card.json").read_text()) for i in range(2)]
    single = durability_card(_models(), AttackTasks(_data()),
                             _budget(trials=3, families=("probe", "finetune-immunized")),
                             tmp_path / "one", progress=False)  # fmt: skip
    for card in cards:
        assert card["resistance"] == json.loads(json.dumps(single["resistance"]))
    # Each worker ran some of the work (both claimed studies).
    workers = set()
    for summary in optuna.get_all_study_summaries(storage):
        if summary.study_name.startswith("claims/"):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            workers |= {t.user_attrs["worker"] for t in study.trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2
    assert math.isfinite(cards[0]["resistance"]["all"]["probe"]["immunized"]["mean"])


@pytest.mark.slow
def test_attack_with_two_workers_on_one_machine_writes_one_card_twice(tmp_path):
    """``attack --workers 2`` starts a second process on the card's storage; both cards agree
    and no study ran twice."""
    from lightning_immunize.cli import main

    root = tmp_path / "fit"
    main(["fit", "--config", str(ROOT / "configs" / "digits.yaml"), "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(root)])  # fmt: skip
    run = root / "lightning_logs" / "version_0"
    out = tmp_path / "card"
    assert main(["attack", str(run), "--budget", "quick", "--out", str(out), "--workers", "2",
                 "--no-progress", "--families", "probe,gd"]) == 0  # fmt: skip
    mine = json.loads((out / "card.json").read_text())
    theirs = json.loads((out / "workers" / "1" / "card.json").read_text())
    assert mine["resistance"] == theirs["resistance"]
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'studies.db'}")
    for summary in optuna.get_all_study_summaries(storage):
        if not summary.study_name.startswith("claims/"):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            indices = [t.user_attrs.get("index") for t in study.trials]
            assert len(indices) == len(set(indices)), summary.study_name
