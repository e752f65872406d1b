"""The durability report card: attackers, worst-case searches (resumable, identical for every
model), the card's files, and clear errors before any trial."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from support.attack_models import tiny_backbone, tiny_images, tiny_models
from support.helpers import run_cli

from lightning_immunize.attacks.attacker import (
    AttackData,
    Attacker,
    batch_size_for,
    run_attack,
    step_marks,
)
from lightning_immunize.attacks.budgets import Budget, SearchSpace, load_budget
from lightning_immunize.attacks.card import advantage_removed, worst_case
from lightning_immunize.attacks.durability import durability_card, read_trials
from lightning_immunize.attacks.families import prepare_network
from lightning_immunize.attacks.sweep import AttackTasks, plan_studies
from lightning_immunize.attacks.tasks import attack_tasks, random_weights
from lightning_immunize.models import LinearExtractor, TimmBackbone

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "MNIST"
needs_mnist = pytest.mark.skipif(
    not (MNIST / "raw").is_dir(), reason="../shared/data/MNIST is not there"
)


_cli = partial(run_cli, timeout=600)  # 10 minutes a command here, not 5


def _tiny_data(n_train: int = 64, name: str = "harmful") -> AttackData:
    x, y = tiny_images(n_train, 1)
    xe, ye = tiny_images(40, 2)
    xs, ys = tiny_images(40, 3)
    return AttackData(name, x, y, xe, ye, "multiclass", 3, xs, ys)


def _tiny_budget(trials: int = 3, horizon: int = 3, **kwargs) -> Budget:
    families = kwargs.pop("families", ("probe", "finetune-immunized"))
    space = SearchSpace(batch_sizes=(8, 16), seed=kwargs.pop("seed", 0), startup_trials=2)
    return Budget(
        name="tiny", trials=trials, horizon=horizon, data_budgets=(None,),
        families={"deep": families, "linear": ("probe", "gd")}, space=space,
        reseeds=kwargs.pop("reseeds", 2), **kwargs,
    )  # fmt: skip


# ------------------------------------------------------------------------------ attackers


def test_step_marks_are_log_spaced_and_end_at_the_horizon():
    assert step_marks(1) == [1]
    assert step_marks(3000) == [1, 3, 10, 30, 100, 300, 1000, 3000]
    assert step_marks(200) == [1, 3, 10, 30, 100, 200]
    with pytest.raises(ValueError, match="first step mark"):
        step_marks(0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"family": "fgsm"}, "unknown attacker family 'fgsm'"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"lr": 0.0}, "learning rate"),
        ({"lr": float("nan")}, "learning rate"),
        ({"horizon": 0}, "horizon must be an integer >= 1"),
    ],
)
def test_attacker_refuses_bad_settings(kwargs, match):
    settings = {"family": "probe", "optimizer": "sgd", "lr": 0.1, "batch_size": 8, "horizon": 3}
    with pytest.raises(ValueError, match=match):
        Attacker(**{**settings, **kwargs})


@pytest.mark.parametrize("family", ["probe", "probe-whitened", "finetune-immunized", "lora"])
def test_a_trial_is_reproducible_and_leaves_the_model_untouched(family):
    model = tiny_backbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attacker = Attacker(family, "adamw", 1e-2, 16, 10, seed=3)
    first = run_attack(model, _tiny_data(), attacker, {})
    second = run_attack(model, _tiny_data(), attacker)
    assert first.marks == [1, 3, 10] and first.scores == second.scores
    assert all(0.0 <= s <= 1.0 for s in first.scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if family.startswith("probe"):  # the seed fixes the head's init and the batch order
        other = run_attack(model, _tiny_data(), Attacker(family, "adamw", 1e-2, 16, 10, seed=4))
        assert other.scores != first.scores


def test_families_train_what_they_say_and_keep_frozen_batchnorm_in_eval():
    from lightning_immunize.models import keep_frozen_in_eval

    model = tiny_backbone()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layer4") for n in trained)
    copy_ = prepare_network(model, "finetune-immunized")
    keep_frozen_in_eval(copy_.train())
    for name, module in copy_.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.training == name.startswith("model.layer4"), name
    all_ = prepare_network(model, "finetune-all")
    assert all(p.requires_grad for p in all_.parameters())
    lora = prepare_network(model, "lora")
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".layer4." in n for n in names)


def test_whitened_features_do_not_see_a_rescaling_of_the_features():
    """A conditioning defence that only rescales feature directions cannot change what the
    whitening attacker trains on (up to a rotation: the Gram matrix is the same)."""
    from lightning_immunize.attacks.families import whitening

    x, y = tiny_images(64, 1)
    xe, ye = tiny_images(40, 2)
    z = x.flatten(1).double()[:, :32]
    scale = torch.logspace(0, -2, 32, dtype=torch.float64)
    mean, w = whitening(z)
    mean_s, w_s = whitening(z * scale)
    gram = ((z - mean) @ w) @ ((z - mean) @ w).T
    gram_s = ((z * scale - mean_s) @ w_s) @ ((z * scale - mean_s) @ w_s).T
    assert w.shape[1] == w_s.shape[1] == 32
    assert torch.allclose(gram, gram_s, atol=1e-8)


# ------------------------------------------------------------------------------ the card


def test_worst_case_and_advantage_removed():
    rows = [
        {"at_1": "0.2", "at_3": "0.5"},
        {"at_1": "0.4", "at_3": "nan"},
    ]
    assert worst_case(rows, [1, 3], True) == [0.4, 0.5]
    assert worst_case(rows, [1, 3], False) == [0.2, 0.5]
    assert advantage_removed(0.9, 0.9, 0.5) == 0.0
    assert advantage_removed(0.9, 0.5, 0.5) == 1.0
    assert advantage_removed(0.9, 0.7, 0.895) is None  # θ_0 has no advantage over scratch
    assert advantage_removed(0.767, 0.762, 0.753) is None  # a 0.014 gap: trial noise
    assert advantage_removed(0.9, 0.7, None) is None
    # θ_0 worse than scratch: no head start to remove, not a negative one read backwards.
    assert advantage_removed(0.5, 0.9, 0.8) is None
    assert advantage_removed(0.5, 0.2, 0.2, higher_is_better=False) is None  # MSE, θ_0 worse
    assert advantage_removed(0.2, 0.5, 0.5, higher_is_better=False) == 1.0  # MSE, θ_0 better


def test_three_models_get_identical_search_spaces_trial_counts_and_seeds(tmp_path):
    budget = _tiny_budget(trials=3)
    tasks = AttackTasks(_tiny_data())
    card = durability_card(tiny_models(), tasks, budget, tmp_path, progress=False)
    rows = read_trials(tmp_path / "trials.csv")
    by_model: dict[str, list] = {}
    for row in rows:
        key = (row["condition"], row["data_budget"], row["family"])
        by_model.setdefault(row["model"], []).append(
            (key, row["trial"], row["seed"], row["horizon"])
        )
    assert sorted(by_model) == ["immunized", "reference", "scratch"]
    assert by_model["immunized"] == by_model["reference"] == by_model["scratch"]
    assert len(by_model["immunized"]) == 2 * 3  # two families, three trials each
    # The random start-up trials draw the same hyperparameters for every model.
    for family in ("probe", "finetune-immunized"):
        for trial in ("0", "1"):
            picked = {
                (r["optimizer"], r["lr"], r["batch_size"])
                for r in rows
                if r["family"] == family and r["trial"] == trial
            }
            assert len(picked) == 1, (family, trial, picked)
    assert card["search_space"]["batch_sizes"] == (8, 16)
    assert (tmp_path / "card.md").is_file() and (tmp_path / "effort.png").is_file()
    assert (tmp_path / "search.png").is_file()


def test_a_trial_reruns_from_its_trials_csv_row(tmp_path):
    models = tiny_models()
    data = _tiny_data()
    durability_card(models, AttackTasks(data), _tiny_budget(), tmp_path, progress=False)
    for row in read_trials(tmp_path / "trials.csv")[::2]:
        attacker = Attacker(
            row["family"], row["optimizer"], float(row["lr"]), int(row["batch_size"]),
            int(row["horizon"]), int(row["seed"]), float(row["weight_decay"]),
            row["schedule"], row["batchnorm"],
        )  # fmt: skip
        again = run_attack(models[row["model"]], data, attacker)
        recorded = [float(row[f"at_{m}"]) for m in attacker.marks]
        assert again.scores == recorded


def test_an_interrupted_search_resumes_without_repeating_a_finished_trial(
    tmp_path, monkeypatch, capsys
):
    import lightning_immunize.attacks.sweep as sweep

    models, tasks, budget = tiny_models(), AttackTasks(_tiny_data()), _tiny_budget(trials=4)
    names = {id(m): n for n, m in models.items()}
    calls: list[tuple] = []
    real = sweep.run_attack

    def counted(model, data, attacker, cache=None, **kwargs):
        result = real(model, data, attacker, cache, **kwargs)
        calls.append((names[id(model)], attacker.family, attacker.seed))
        if len(calls) == 6:
            raise KeyboardInterrupt  # killed after the 6th run ran, before it was stored
        return result

    monkeypatch.setattr(sweep, "run_attack", counted)
    with pytest.raises(KeyboardInterrupt):
        durability_card(models, tasks, budget, tmp_path / "resumed", progress=False)
    # 4 search trials and 1 of the best configuration's 2 re-runs were stored
    assert len(read_trials(tmp_path / "resumed" / "trials.csv")) == 4
    assert len(read_trials(tmp_path / "resumed" / "confirm.csv")) == 1
    capsys.readouterr()
    durability_card(models, tasks, budget, tmp_path / "resumed", progress=False)
    runs = 3 * 2 * (4 + 2)
    assert f"resuming: 5 of {runs} trials done" in capsys.readouterr().err
    # The card's attacker time counts every run, those of the interrupted one included.
    rows = read_trials(tmp_path / "resumed" / "trials.csv")
    rows += read_trials(tmp_path / "resumed" / "confirm.csv")
    card_md = (tmp_path / "resumed" / "card.md").read_text()
    total = sum(float(r["seconds"]) for r in rows)
    assert f"{runs} trials, {_seconds_text(total)} of attacker time in all" in card_md
    # The 6th run was lost with the kill and ran again; no finished one did.
    assert len(calls) == runs + 1
    assert len(set(calls)) == runs
    assert calls.count(calls[5]) == 2
    monkeypatch.setattr(sweep, "run_attack", real)
    durability_card(models, tasks, budget, tmp_path / "straight", progress=False)
    resumed = json.loads((tmp_path / "resumed" / "card.json").read_text())
    straight = json.loads((tmp_path / "straight" / "card.json").read_text())
    assert resumed == straight

    def without_seconds(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_trials(path)]

    assert without_seconds(tmp_path / "resumed" / "trials.csv") == without_seconds(
        tmp_path / "straight" / "trials.csv"
    )
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'resumed' / 'studies.db'}")
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if summary.study_name.startswith("claims/"):
            continue
        finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                            optuna.trial.TrialState.PRUNED))  # fmt: skip
        expected = 2 if summary.study_name.endswith("/confirm") else 4
        assert len(finished) == expected, summary.study_name


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def test_cards_sharing_a_storage_reuse_only_the_studies_of_identical_models(tmp_path, monkeypatch):
    import lightning_immunize.attacks.sweep as sweep

    models, tasks, budget = tiny_models(), AttackTasks(_tiny_data()), _tiny_budget(trials=2)
    real = sweep.run_attack
    calls: list[str] = []

    def counted(model, data, attacker, cache=None, **kwargs):
        calls.append(next(n for n, m in current.items() if m is model))
        return real(model, data, attacker, cache, **kwargs)

    monkeypatch.setattr(sweep, "run_attack", counted)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    current = models
    durability_card(models, tasks, budget, tmp_path / "a", storage=url, progress=False)
    assert sorted(set(calls)) == ["immunized", "reference", "scratch"]
    other = dict(models, immunized=tiny_backbone(1))
    current, calls[:] = other, []
    durability_card(other, tasks, budget, tmp_path / "b", storage=url, progress=False)
    # two families, two trials and two re-runs each; θ_0 and scratch reused
    assert calls == ["immunized"] * 2 * (2 + 2)

    def rows(card: str, model: str) -> list[dict]:
        kept = [r for r in read_trials(tmp_path / card / "trials.csv") if r["model"] == model]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in kept]

    for model in ("reference", "scratch"):
        assert rows("a", model) == rows("b", model)
    # A different horizon is a different search: nothing is reused.
    calls[:] = []
    durability_card(other, tasks, _tiny_budget(trials=2, horizon=2), tmp_path / "c",
                    storage=url, progress=False)  # fmt: skip
    assert len(calls) == 3 * 2 * (2 + 2)


# ------------------------------------------------------------------------------ bad input


def test_lora_on_a_linear_extractor_is_refused_before_any_trial(tmp_path):
    linear = LinearExtractor(4, 4, init="identity").double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    data = AttackData("h", x, (x[:, 0] > 0).double(), x[:20], (x[:20, 0] > 0).double(), "binary", 1)
    models = {"immunized": linear, "reference": LinearExtractor(4, 4, init="identity").double()}
    with pytest.raises(ValueError, match="'lora' cannot attack the immunized model"):
        durability_card(models, AttackTasks(data), _tiny_budget(), tmp_path,
                        families=["probe", "lora"], progress=False)  # fmt: skip
    assert not (tmp_path / "trials.csv").exists()


def test_a_batch_larger_than_the_split_trains_on_every_sample_and_the_card_says_so():
    data = _tiny_data(n_train=12)
    assert batch_size_for(12, 16, "finetune-all") == 12
    assert batch_size_for(12, 8, "finetune-all") == 8
    assert batch_size_for(12, 8, "gd") == 12
    notes: list[str] = []
    plan_studies(tiny_models(), AttackTasks(data), _tiny_budget(), ["probe"], notes)
    assert notes == [
        "harmful with 12 training samples: the search space's batch size(s) [16] exceed them, "
        "so those trials train on all 12 samples each step"
    ]
    attacker = Attacker("finetune-all", "sgd", 0.01, 16, horizon=2, seed=0)
    result = run_attack(tiny_models()["immunized"], data, attacker)
    assert all(0.0 <= s <= 1.0 for s in result.scores)


def test_bad_budgets_are_refused(tmp_path):
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump({"budgets": {"b": {"trials": 2, "horizon": 0}}}))
    with pytest.raises(ValueError, match="budget 'b': horizon must be an integer >= 1"):
        load_budget("b", path)
    with pytest.raises(
        ValueError, match=r"unknown attack budget 'huge'.*'durable', 'long', 'quick'"
    ):
        load_budget("huge")
    path.write_text(yaml.safe_dump({"budgets": {"b": {"trials": 2, "horizon": 5,
                                                      "data_budgets": [0]}}}))  # fmt: skip
    with pytest.raises(ValueError, match="data budget is a positive integer or 'all', got 0"):
        load_budget("b", path)


def test_shipped_budgets_load():
    for name in ("quick", "standard", "long"):
        budget = load_budget(name)
        assert budget.trials >= 1 and budget.space.lr_low == 1e-5 and budget.space.lr_high == 1.0
        assert budget.space.batch_sizes == (32, 64, 128)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A two-step immunization of a tiny timm model on 600 MNIST images per side, half of
    D_H's training images withheld from it."""
    if not (MNIST / "raw").is_dir():
        pytest.skip("../shared/data/MNIST is not there")
    root = tmp_path_factory.mktemp("tiny_run")
    config = yaml.safe_load((ROOT / "configs" / "cnn_mnist.yaml").read_text())
    card = {"class_path": "lightning_immunize.callbacks.DurabilityCard",
            "init_args": {"budget": "quick", "families": ["probe", "lora"]}}  # fmt: skip
    config["trainer"] = {
        "max_steps": 2, "accelerator": "cpu", "num_sanity_val_steps": 0,
        "limit_val_batches": 0, "enable_progress_bar": False, "default_root_dir": str(root),
        "callbacks": [card],
    }  # fmt: skip
    config.pop("theta0")  # θ_0 as built: the tiny model is not pre-trained
    config["model"]["extractor"]["init_args"].update(model_name="test_resnet")
    config["data"]["init_args"].update(
        root=str(MNIST), max_samples=600, withhold_harmful=0.5, batch_size=32
    )
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = _cli("fit", "--config", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "lightning_logs" / "version_0"


@needs_mnist
def test_durability_callback_logs_worst_case_figures_at_the_end_of_fit(tiny_run):
    with (tiny_run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    for family in ("probe", "lora"):
        assert f"attack/{family}/n=128/A_immunized" in logged
        assert f"attack/{family}/n=128/A_reference" in logged
    card = json.loads((tiny_run / "attack-quick" / "card.json").read_text())
    assert set(card["resistance"]["128"]) == {"probe", "lora"}


@needs_mnist
@pytest.mark.slow
def test_quick_budget_end_to_end_on_a_tiny_model(tiny_run, tmp_path):
    out = _cli("attack", str(tiny_run), "--budget", "quick", "--out", str(tmp_path / "card"))
    assert out.returncode == 0, out.stderr[-3000:]
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    for name in ("card.md", "trials.csv", "effort.png", "search.png"):
        assert (tmp_path / "card" / name).is_file(), name
    quick = load_budget("quick")
    rows = read_trials(tmp_path / "card" / "trials.csv")
    studies = {(r["condition"], r["data_budget"], r["model"], r["family"]) for r in rows}
    assert len(rows) == quick.trials * len(studies)
    families = set(quick.families["deep"])
    assert {f for c, _, _, f in studies if c == "resistance"} == families
    assert {c for c, *_ in studies} == {"resistance", "generalization", "trainability"}
    assert set(card["stability"]) == {"immunized", "reference"}
    text = (tmp_path / "card" / "card.md").read_text()
    for section in ("## Resistance", "## Stability", "## Generalization", "## Trainability"):
        assert section in text
    assert all(f"`{f}`: **" in text for f in families)  # one sentence per family


@needs_mnist
def test_a_control_run_is_attacked_beside_theta0_and_a_foreign_one_is_refused(tiny_run, tmp_path):
    """``--control``: the control's searches and ratios are in the card; a control whose
    architecture differs from the immunized model is refused before any trial."""
    from lightning_immunize.cli import main

    out = tmp_path / "card"
    args = ["attack", str(tiny_run), "--budget", "quick", "--out", str(out), "--no-progress",
            "--families", "probe,finetune-immunized", "--control", str(tiny_run)]  # fmt: skip
    assert main(args) == 0
    card = json.loads((out / "card.json").read_text())
    entry = card["resistance"]["128"]["finetune-immunized"]
    assert {"control", "ceiling", "immunized", "reference", "scratch"} <= set(entry)
    assert "control" not in card["resistance"]["128"]["probe"]  # network families only
    assert card["stability"]["control"] == pytest.approx(card["stability"]["immunized"])
    assert "advantage removed against the control" in (out / "card.md").read_text()
    digits = tmp_path / "digits"
    main(["fit", "--config", str(ROOT / "configs" / "digits.yaml"), "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(digits)])  # fmt: skip
    foreign = digits / "lightning_logs" / "version_0"
    with pytest.raises(ValueError, match="--control .*not the immunized model's architecture"):
        main(["attack", str(tiny_run), "--budget", "quick", "--out", str(tmp_path / "x"),
              "--control", str(foreign)])  # fmt: skip
    assert not (tmp_path / "x").exists()


@needs_mnist
@pytest.mark.slow
def test_killed_attack_command_resumes_to_the_same_card(tiny_run, tmp_path):
    out = tmp_path / "card"
    few = ["--families", "probe,finetune-immunized"]
    args = [sys.executable, "-m", "lightning_immunize.cli", "attack", str(tiny_run),
            "--budget", "quick", "--out", str(out), "--no-progress", *few]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trials = out / "trials.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if trials.is_file() and len(trials.read_text().splitlines()) > 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_trials(trials))
    assert 0 < done_before < 26
    again = _cli("attack", str(tiny_run), "--budget", "quick", "--out", str(out), "--no-progress",
                 *few)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    straight = _cli("attack", str(tiny_run), "--budget", "quick", "--out",
                    str(tmp_path / "straight"), "--no-progress", *few)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert (
        json.loads((out / "card.json").read_text())["resistance"]
        == json.loads((tmp_path / "straight" / "card.json").read_text())["resistance"]
    )
    resumed = json.loads((out / "card.json").read_text())
    fresh = json.loads((tmp_path / "straight" / "card.json").read_text())
    for key in ("command", "checkpoint", "config"):
        resumed.pop(key, None), fresh.pop(key, None)
    assert resumed == fresh


@needs_mnist
def test_attack_command_refuses_bad_input_before_loading_anything(tiny_run, tmp_path):
    out = _cli("attack", str(tiny_run), "--budget", "huge", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "unknown attack budget 'huge'" in out.stderr
    out = _cli("attack", str(tiny_run), "--budget", "quick", "--families", "probe,fgsm",
               "--out", str(tmp_path / "y"))  # fmt: skip
    assert out.returncode == 2 and "unknown attacker family 'fgsm'" in out.stderr
    assert not (tmp_path / "y" / "trials.csv").exists()


@needs_mnist
def test_withheld_harmful_samples_never_reach_a_training_batch():
    from lightning_immunize.datamodules import MNISTHalvesDataModule

    full = MNISTHalvesDataModule(MNIST, max_samples=200)
    held = MNISTHalvesDataModule(MNIST, max_samples=200, withhold_harmful=0.25)
    _, _, x_h, _ = full.full_tensors("train")
    _, _, x_kept, _ = held.full_tensors("train")
    withheld = held.withheld_harmful.tensors[0]
    assert len(withheld) == 40 and len(x_kept) == 120
    assert torch.equal(torch.cat([withheld, x_kept]), x_h)
    tasks = attack_tasks(held, eval_samples=None)
    assert torch.equal(tasks.harmful_unseen.train_x, withheld)
    assert torch.equal(tasks.harmful.train_x, x_kept)
    with pytest.raises(ValueError, match=r"withhold_harmful must be in \[0, 1\), got 1.0"):
        MNISTHalvesDataModule(MNIST, withhold_harmful=1.0)


def _linear_binary_data() -> AttackData:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 6)
    y = (x @ w > 0).double()
    return AttackData("h", x[:150], y[:150], x[150:], y[150:], "binary", 1)


def test_gd_exact_is_the_papers_attacker_and_needs_one_trial(tmp_path):
    from lightning_immunize.probing import least_squares_solution

    data = _linear_binary_data()
    identity = LinearExtractor(6, 6, init="identity").double()
    result = run_attack(identity, data, Attacker("gd-exact", "sgd", 1.0, 32, 3000))
    w_star = least_squares_solution(data.train_x, 2 * data.train_y - 1)
    closed_form = float(((data.eval_x @ w_star > 0) == (data.eval_y > 0.5)).double().mean())
    assert result.scores[-1] == pytest.approx(closed_form)
    models = {"immunized": identity, "reference": LinearExtractor(6, 6, init="identity").double()}
    budget = _tiny_budget(trials=3, horizon=30)
    card = durability_card(models, AttackTasks(data), budget, tmp_path,
                           families=["probe", "gd", "gd-exact"], progress=False)  # fmt: skip
    rows = read_trials(tmp_path / "trials.csv")
    counts = {(r["model"], r["family"]): 0 for r in rows}
    for r in rows:
        counts[(r["model"], r["family"])] += 1
    assert counts == {(m, f): (1 if f == "gd-exact" else 3) for m in models
                      for f in ("probe", "gd", "gd-exact")}  # fmt: skip
    entry = card["resistance"]["all"]["gd-exact"]
    assert "scratch" not in entry and entry["advantage_removed"] is None
    assert entry["immunized"]["worst_case"] == entry["reference"]["worst_case"]


def test_the_scratch_model_is_initialised_by_timm_as_the_architecture_is_at_creation():
    trained = TimmBackbone("test_resnet", in_chans=1, num_classes=3, seed=0, trainable=["layer4"])
    with torch.no_grad():  # what training does to θ_0: no zero BatchNorm gamma, moved statistics
        for module in trained.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(0.7)
                module.running_mean.fill_(3.0)
    scratch = random_weights(trained, seed=1)
    for name, block in scratch.model.named_modules():
        if type(block).__name__ == "BasicBlock":  # timm's zero_init_last, not a generic reset
            assert torch.count_nonzero(block.bn2.weight) == 0, name
            assert torch.all(block.bn1.weight == 1), name
    for module in scratch.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.running_mean == 0)  # statistics reset too
    conv = scratch.model.layer1[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert float(conv.weight.std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.3)  # fan-out He
    assert [p.requires_grad for p in scratch.parameters()] == [
        p.requires_grad for p in trained.parameters()
    ]
    again = random_weights(trained, seed=1)
    pairs = zip(scratch.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_either_spelling_of_gd_exact_selects_the_family(tmp_path):
    from lightning_immunize.attacks.families import family_name

    assert family_name("gd_exact") == family_name("gd-exact") == "gd-exact"
    path = tmp_path / "attack.yaml"
    path.write_text(
        "budgets:\n  b: {trials: 1, horizon: 10, data_budgets: [8], eval_samples: 8,\n"
        "      families: {linear: [gd_exact, probe], deep: [probe]}}\n"
    )
    assert load_budget("b", path).families["linear"] == ("gd-exact", "probe")
