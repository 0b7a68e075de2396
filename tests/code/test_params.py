from pathlib import Path

import pytest
import yaml

from lmpipe.errors import ParamsError
from lmpipe.params import Params, load_params

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, mutate) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repo_params_load_and_are_typed():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert isinstance(params.train.learning_rate, float)
    assert params.split.train + params.split.val + params.split.test == pytest.approx(1.0)
    assert len(params.digest()) == 12


def test_every_key_in_params_yaml_has_a_comment():
    for number, line in enumerate((ROOT / "params.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped:
            assert "#" in line, f"params.yaml line {number} has no comment: {line!r}"


@pytest.mark.parametrize(
    ("mutate", "key", "fragment"),
    [
        (lambda p: p["train"].update(lerning_rate=0.1), "train.lerning_rate", "unknown key"),
        (lambda p: p.update(trian={}), "trian", "unknown key"),
        (lambda p: p["train"].update(learning_rate=-1e-3), "train.learning_rate", "must be > 0"),
        (lambda p: p["train"].update(epochs="three"), "train.epochs", "must be an integer"),
        (lambda p: p["train"].update(epochs=2.5), "train.epochs", "must be an integer"),
        (lambda p: p["split"].update(test=0.3), "split.train", "must sum to 1"),
        (lambda p: p["split"].update(val=0), "split.val", "between 0 and 1"),
        (lambda p: p["train"].pop("patience"), "train.patience", "missing"),
        (lambda p: p["prepare"].update(on_conflict="maybe"), "prepare.on_conflict", "must be one of"),
        (lambda p: p["prepare"].update(source="data.xlsx"), "prepare.source", ".csv, .jsonl or .parquet"),
        (lambda p: p["prepare"].update(encoding="utf-99"), "prepare.encoding", "unknown encoding"),
        (lambda p: p["evaluate"]["baseline"].update(C=0), "evaluate.baseline.C", "must be > 0"),
        (lambda p: p["train"].update(precision=True), "train.precision", "must be one of"),
        (
            lambda p: p["search"]["space"].update(lerning_rate={"type": "float", "low": 0.1, "high": 0.2}),
            "search.space.lerning_rate",
            "unknown train param",
        ),
        (
            lambda p: p["search"]["space"].update(batch_size={"type": "categorical", "choices": []}),
            "search.space.batch_size.choices",
            "non-empty list",
        ),
        (
            lambda p: p["search"]["space"]["learning_rate"].update(low=1e-3, high=1e-4),
            "search.space.learning_rate.low",
            "must be <= high",
        ),
        (
            lambda p: p["search"]["space"]["learning_rate"].update(low=0.0),
            "search.space.learning_rate.low",
            "must be > 0 on a log scale",
        ),
        (
            lambda p: p["search"]["space"].update(batch_size={"type": "categorical", "choices": [8, 0]}),
            "search.space.batch_size",
            "value 0: must be >= 1",
        ),
        (
            lambda p: p["search"]["space"].update(epochs={"type": "int", "low": 1, "high": "x"}),
            "search.space.epochs.high",
            "must be a number",
        ),
        (
            lambda p: p["search"].update(strategy="grid"),
            "search.space.learning_rate",
            "grid search needs a step",
        ),
        (
            lambda p: p["search"]["space"]["learning_rate"].update(typo=1),
            "search.space.learning_rate.typo",
            "unknown key",
        ),
        (lambda p: p["search"].update(space={}), "search.space", "at least one parameter"),
    ],
)
def test_bad_values_name_the_key(tmp_path, mutate, key, fragment):
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert err.value.key == key
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_float_written_without_dot_is_accepted(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        (ROOT / "params.yaml").read_text().replace("learning_rate: 1.0e-4", "learning_rate: 1e-4")
    )
    assert load_params(path).train.learning_rate == pytest.approx(1e-4)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_overrides_are_checked_like_the_file():
    params = load_params(ROOT / "params.yaml", overrides={"train": {"learning_rate": 3e-5}})
    assert params.train.learning_rate == 3e-5
    with pytest.raises(ParamsError, match="train.batch_size"):
        load_params(ROOT / "params.yaml", overrides={"train": {"batch_size": 0}})


def test_digest_changes_with_any_value():
    a = load_params(ROOT / "params.yaml")
    b = load_params(ROOT / "params.yaml", overrides={"evaluate": {"batch_size": 7}})
    assert a.digest() != b.digest()
    assert a.digest() == load_params(ROOT / "params.yaml").digest()


def test_grid_points():
    from lmpipe.params import SpaceParam

    assert SpaceParam("float", 0.0, 0.2, step=0.1).grid() == [0.0, 0.1, 0.2]
    assert SpaceParam("int", 1, 5, step=2).grid() == [1, 3, 5]
    assert SpaceParam("categorical", choices=["a", "b"]).grid() == ["a", "b"]
