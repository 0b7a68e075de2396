"""The search stage's pieces that decide what a trial's value is: pruning, duplicates, seeds, steps."""

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from lmpipe.params import load_params
from lmpipe.tuning import optuna_study

ROOT = Path(__file__).resolve().parents[2]


def _study(pruner=None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", pruner=pruner or optuna.pruners.NopPruner())


def test_a_trial_is_never_pruned_on_its_last_step():
    study = _study(optuna.pruners.ThresholdPruner(lower=0.99))  # prunes every value below 0.99
    trial = study.ask()
    reporter = optuna_study.PruningReporter(trial, step_offset=0, last_step=2)
    with pytest.raises(optuna.TrialPruned):
        reporter.on_evaluate(None, SimpleNamespace(epoch=1.0), None, metrics={"eval_macro_f1": 0.5})

    trial = study.ask()
    reporter = optuna_study.PruningReporter(trial, step_offset=0, last_step=2)
    reporter.on_evaluate(None, SimpleNamespace(epoch=2.0), None, metrics={"eval_macro_f1": 0.5})
    assert trial.should_prune()  # the pruner would have stopped it: the reporter chose not to


def test_a_completed_twin_is_found_and_only_a_completed_one():
    study = _study()
    dist = {"lr": optuna.distributions.CategoricalDistribution([0.1, 0.2])}
    make = optuna.trial.create_trial
    study.add_trial(
        make(params={"lr": 0.1}, distributions=dist, value=0.8, user_attrs={"fold_values": [0.8]})
    )
    study.add_trial(make(params={"lr": 0.2}, distributions=dist, state=optuna.trial.TrialState.PRUNED))
    trial = study.ask()
    assert optuna_study.completed_twin(trial, {"lr": 0.1}).number == 0
    assert optuna_study.completed_twin(trial, {"lr": 0.2}) is None  # pruned: its value is unknown


def test_every_trial_shares_one_seed_derived_from_the_base_seed():
    assert optuna_study.trial_seed(42) == optuna_study.trial_seed(42)
    assert optuna_study.trial_seed(42) != optuna_study.trial_seed(43)


def test_max_trial_steps_covers_searched_epochs_phases_and_folds(tmp_path):
    params = load_params(ROOT / "params.yaml")  # epochs searched up to 3
    assert optuna_study.max_trial_steps(params) == 3 * params.search.folds
    space = {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}}
    plain = load_params(ROOT / "params.yaml", {"search": {"space": space, "folds": 2}})
    assert optuna_study.max_trial_steps(plain) == plain.search.trial.epochs * 2
    phased = load_params(
        ROOT / "params.yaml", {"search": {"space": space}, "train": {"strategy": "gradual_unfreezing"}}
    )
    assert optuna_study.max_trial_steps(phased) == sum(p.epochs for p in phased.train.phases)


def _toy_objective(trial: optuna.Trial) -> float:
    x = trial.suggest_categorical("x", [1, 2, 3])
    twin = optuna_study.completed_twin(trial, {"x": x})
    if twin is not None:
        trial.set_user_attr("duplicate_of", twin.number)
    trial.set_user_attr("fold_values", [float(x)])
    return float(x)


def _worked(tmp_path, budget: optuna_study.Budget) -> optuna.Study:
    """A study run by one worker loop (the stage's) on a SQLite storage until ``budget`` closes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna_study.open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=10)
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(study_name="toy", storage=storage, direction="maximize", sampler=sampler)
    optuna_study.work(study, storage, _toy_objective, budget, timeout=None)
    return study


def test_duplicates_do_not_use_up_the_trial_budget(tmp_path):
    study = _worked(tmp_path, optuna_study.Budget(2))
    trained = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    assert len(trained) == 2 and len({t.params["x"] for t in trained}) == 2


def test_a_finite_space_stops_when_every_point_has_trained(tmp_path):
    study = _worked(tmp_path, optuna_study.Budget(10, space_points=3))
    trained = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    assert sorted(t.params["x"] for t in trained) == [1, 2, 3]
    assert len(study.trials) < 40


def test_the_percentile_pruner_keeps_the_top_share_and_median_the_top_half():
    def pruned(pruner_name: str, value: float) -> bool:
        params = load_params(ROOT / "params.yaml", {"search": {"pruner": pruner_name, "percentile": 75}})
        study = _study(optuna_study.make_pruner(params.search, max_steps=2))
        for v in (0.2, 0.4, 0.6, 0.8):  # four finished trials, their epoch-1 scores
            trial = study.ask()
            trial.report(v, 1)
            study.tell(trial, v)
        trial = study.ask()
        trial.report(value, 1)
        return trial.should_prune()

    # optuna keeps the *top* `percentile` per cent when maximising: 75 prunes only the bottom quarter
    assert pruned("percentile", 0.3) and not pruned("percentile", 0.45)
    assert pruned("median", 0.45) and not pruned("median", 0.55)
