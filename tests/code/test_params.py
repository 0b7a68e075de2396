from pathlib import Path

import pytest
import yaml

from lmpipe.errors import ParamsError
from lmpipe.params import Params, load_params, write_params

ROOT = Path(__file__).resolve().parents[2]


def case(overrides: dict, key: str, fragment: str, **options):
    """A case of ``test_bad_values_name_the_key``: params.yaml with ``overrides`` (and ``write_params``'
    ``options``: ``allow_new=True`` where the case adds a key) fails to load on ``key``, with a message
    holding ``fragment``."""
    return pytest.param(overrides, options, key, fragment, id=key)


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
    ("overrides", "options", "key", "fragment"),
    [
        case({"train.lerning_rate": 0.1}, "train.lerning_rate", "unknown key", allow_new=True),
        case({"trian": {}}, "trian", "unknown key", allow_new=True),
        case({"train.learning_rate": -1e-3}, "train.learning_rate", "must be > 0"),
        case({"train.epochs": "three"}, "train.epochs", "must be an integer"),
        case({"train.epochs": 2.5}, "train.epochs", "must be an integer"),
        case({"split.test": 0.3}, "split.train", "must sum to 1"),
        case({"split.val": 0}, "split.val", "between 0 and 1"),
        case({}, "train.patience", "missing", remove=["train.patience"]),
        case({"prepare.on_conflict": "maybe"}, "prepare.on_conflict", "must be one of"),
        case({"prepare.source": "data.xlsx"}, "prepare.source", ".csv, .jsonl or .parquet"),
        case({"prepare.encoding": "utf-99"}, "prepare.encoding", "unknown encoding"),
        case({"evaluate.baseline.C": 0}, "evaluate.baseline.C", "must be > 0"),
        case({"train.precision": True}, "train.precision", "must be one of"),
        case(
            {"search.space.lerning_rate": {"type": "float", "low": 0.1, "high": 0.2}},
            "search.space.lerning_rate",
            "unknown train param",
            allow_new=True,
        ),
        case(
            {"search.space.batch_size": {"type": "categorical", "choices": []}},
            "search.space.batch_size.choices",
            "non-empty list",
        ),
        case(
            {"search.space.learning_rate": {"low": 1e-3, "high": 1e-4}},
            "search.space.learning_rate.low",
            "must be <= high",
        ),
        case(
            {"search.space.learning_rate.low": 0.0},
            "search.space.learning_rate.low",
            "must be > 0 on a log scale",
        ),
        case(
            {"search.space.batch_size": {"type": "categorical", "choices": [8, 0]}},
            "search.space.batch_size",
            "value 0: must be >= 1",
        ),
        case(
            {"search.space.epochs": {"type": "int", "low": 1, "high": "x"}},
            "search.space.epochs.high",
            "must be a number",
        ),
        case({"search.strategy": "grid"}, "search.space.learning_rate", "grid search needs a step"),
        case(
            {"search.space.learning_rate.typo": 1},
            "search.space.learning_rate.typo",
            "unknown key",
            allow_new=True,
        ),
        case({"search.space": {}}, "search.space", "at least one parameter", replace=["search.space"]),
        case({"train.distributed.processes": 0}, "train.distributed.processes", "must be >= 1"),
        case({"train.distributed.procs": 2}, "train.distributed.procs", "unknown key", allow_new=True),
        case(
            {"train.distributed.nnodes": 2, "train.distributed.node_rank": 2},
            "train.distributed.node_rank",
            "between 0 and nnodes - 1",
        ),
        case(
            {"train.distributed.nnodes": 2, "train.distributed.rdzv_endpoint": "machine0"},
            "train.distributed.rdzv_endpoint",
            "host:port",
        ),
        case({"train.distributed.rdzv_timeout": 0}, "train.distributed.rdzv_timeout", "must be >= 1"),
        case(
            {"train.distributed.processes": 2, "train.strategy": "gradual_unfreezing"},
            "train.strategy",
            "several processes",
        ),
        case(
            {"search.space.distributed": {"type": "int", "low": 1, "high": 2}},
            "search.space.distributed",
            "unknown train param",
            allow_new=True,
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, options, key, fragment):
    path = write_params(tmp_path / "params.yaml", overrides, ROOT / "params.yaml", **options)
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


# ------------------------------------------------------------------------------------------ write_params
def test_write_params_deep_merges_and_keeps_key_order(tmp_path):
    original = yaml.safe_load((ROOT / "params.yaml").read_text())
    dest = write_params(
        tmp_path / "params.yaml",
        {"train": {"epochs": 1, "lora": {"rank": 4}, "phases": [original["train"]["phases"][0]]}},
        source=ROOT / "params.yaml",
    )
    assert dest == tmp_path / "params.yaml"
    written = yaml.safe_load(dest.read_text())
    assert written["train"]["epochs"] == 1
    assert written["train"]["lora"] == {**original["train"]["lora"], "rank": 4}  # siblings kept
    assert written["train"]["phases"] == original["train"]["phases"][:1]  # a list is replaced whole
    assert written["train"]["batch_size"] == original["train"]["batch_size"]
    assert {k: v for k, v in written.items() if k != "train"} == {
        k: v for k, v in original.items() if k != "train"
    }
    assert list(written) == list(original)
    assert list(written["train"]) == list(original["train"])
    assert list(written["train"]["lora"]) == list(original["train"]["lora"])
    assert load_params(dest).train.lora.rank == 4


def test_write_params_dotted_keys_match_nested_ones(tmp_path):
    nested = write_params(
        tmp_path / "nested.yaml", {"train": {"epochs": 3, "lora": {"rank": 4}}}, ROOT / "params.yaml"
    )
    dotted = write_params(
        tmp_path / "dotted.yaml", {"train.epochs": 3, "train": {"lora.rank": 4}}, ROOT / "params.yaml"
    )
    assert dotted.read_text() == nested.read_text()
    # list items as the loader's errors name them: one item of train.phases changes, the rest stay
    original = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["phases"]
    indexed = write_params(tmp_path / "indexed.yaml", {"train.phases[1].epochs": 3}, ROOT / "params.yaml")
    phases = yaml.safe_load(indexed.read_text())["train"]["phases"]
    assert phases == [original[0], {**original[1], "epochs": 3}, original[2]]
    with pytest.raises(ValueError, match="not a key path"):
        write_params(tmp_path / "x.yaml", {"train..epochs": 1}, ROOT / "params.yaml")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train.lora.rnak": 4}, "train.lora.rnak"),
        ({"train": {"lora": {"rnak": 4}}}, "train.lora.rnak"),
        ({"trian.epochs": 1}, "trian"),
        ({"train.phases[3].epochs": 1}, "train.phases[3]"),
        ({"train.epochs.max": 1}, "train.epochs.max"),
    ],
)
def test_write_params_rejects_a_key_the_file_lacks(tmp_path, overrides, key):
    dest = tmp_path / "params.yaml"
    with pytest.raises(ParamsError) as err:
        write_params(dest, overrides, ROOT / "params.yaml")
    assert err.value.key == key
    assert f": {key}: " in str(err.value) and "not in the source file" in str(err.value)
    assert not dest.exists()  # nothing written


def test_write_params_leaves_the_source_alone(tmp_path):
    source = tmp_path / "source.yaml"
    source.write_text((ROOT / "params.yaml").read_text())
    before = source.read_bytes()
    dest = write_params(tmp_path / "copy" / "params.yaml", {"base": {"seed": 7}}, source)
    assert source.read_bytes() == before
    assert load_params(dest).base.seed == 7 and load_params(source).base.seed == 42
    # without a source it changes dest in place, atomically (no temporary file left beside it)
    write_params(dest, {"base.seed": 8})
    assert load_params(dest).base.seed == 8
    assert sorted(p.name for p in dest.parent.iterdir()) == ["params.yaml"]
    assert dest.stat().st_mode == source.stat().st_mode  # the file's mode, not the temporary file's
    with pytest.raises(ValueError, match="is a folder"):
        write_params(tmp_path, {"base.seed": 9})


def test_write_params_options_and_unchecked_values(tmp_path):
    space = {"learning_rate": {"type": "categorical", "choices": [1e-4, 3e-4]}}
    path = write_params(
        tmp_path / "params.yaml",
        {"search": {"space": space, "n_trials": "many"}, "train": {"extra": {"a": 1}}},
        ROOT / "params.yaml",
        allow_new=True,
        replace=["search.space"],
        remove=["train.patience"],
    )
    written = yaml.safe_load(path.read_text())
    assert written["search"]["space"] == space  # replaced whole, not merged
    assert written["search"]["n_trials"] == "many"  # values are load_params' to check
    assert list(written["train"])[-1] == "extra" and written["train"]["extra"] == {"a": 1}
    assert "patience" not in written["train"]
    with pytest.raises(ValueError, match="nothing in overrides sets search.spaces"):
        write_params(tmp_path / "params.yaml", {"search.n_trials": 2}, replace=["search.spaces"])
    with pytest.raises(ParamsError, match="train.patiance"):
        write_params(tmp_path / "params.yaml", {}, ROOT / "params.yaml", remove=["train.patiance"])
    # one object given twice is written out twice, not as a YAML anchor and its alias
    shared = [1]
    twice = write_params(
        tmp_path / "twice.yaml",
        {"export.latency.batch_sizes": shared, "analyze.robustness.perturbations.lowercase": shared},
        ROOT / "params.yaml",
    )
    assert "&id" not in twice.read_text() and "*id" not in twice.read_text()
