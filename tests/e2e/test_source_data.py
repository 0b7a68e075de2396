"""The user's data is a real DVC dependency: editing the source file (or a file of a source folder) re-runs
prepare and what follows; a missing source fails in one line."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import git_commit, new_repo, run

pytestmark = pytest.mark.extended

TOPICS = {
    "sport": "the team won the match after a late goal in the second half",
    "tech": "the new phone ships with a faster chip and a brighter screen",
    "politics": "the minister answered questions about the budget in parliament",
}


def write_csv(path, rows_per_class: int) -> None:
    lines = ["text,label"]
    for label, text in TOPICS.items():
        lines += [f'"{text}, story {i}",{label}' for i in range(rows_per_class)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def ran(result) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", result.stdout)


def test_editing_the_user_csv_reruns_prepare_and_what_follows(tmp_path):
    repo = new_repo(tmp_path, {"prepare": {"source": "data/raw/news.csv"}, "base": {"max_length": 16}})
    csv = repo / "data/raw/news.csv"
    write_csv(csv, 10)
    git_commit(repo, "user data")
    first = run(["dvc", "repro", "split"], repo, timeout=300)
    assert ran(first) == ["prepare", "split"]
    report = json.loads((repo / "reports/prepare/report.json").read_text())
    assert report["rows_in"] == 30 and report["source"] == "`data/raw/news.csv`"
    lock = (repo / "dvc.lock").read_text()
    assert "path: data/raw/news.csv" in lock  # the data file is recorded with its hash
    assert run(["dvc", "status", "prepare"], repo).stdout.strip().endswith("up to date.")

    with csv.open("a", encoding="utf-8") as f:  # a user appends a row
        f.write('"a brand new story about the league table",sport\n')
    status = run(["dvc", "status", "--with-deps", "split"], repo).stdout
    assert "prepare:" in status and "modified:" in status and "data/raw/news.csv" in status
    second = run(["dvc", "repro", "split"], repo, timeout=300)
    assert ran(second) == ["prepare", "split"]
    report = json.loads((repo / "reports/prepare/report.json").read_text())
    assert report["rows_in"] == 31 and report["rows_per_class"]["sport"] == 11
    sizes = json.loads((repo / "reports/split/report.json").read_text())["sizes"]
    assert sum(sizes.values()) == 31


def test_a_folder_of_label_txt_files_is_a_source_too(tmp_path):
    repo = new_repo(tmp_path, {"prepare": {"source": "data/raw/texts"}, "base": {"max_length": 16}})
    for label, text in TOPICS.items():
        for i in range(4):
            path = repo / "data/raw/texts" / label / f"{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{text} ({i})", encoding="utf-8")
    git_commit(repo, "user data")
    assert ran(run(["dvc", "repro", "prepare"], repo, timeout=300)) == ["prepare"]
    (repo / "data/raw/texts/tech/new.txt").write_text("a laptop review", encoding="utf-8")
    assert "prepare:" in run(["dvc", "status", "prepare"], repo).stdout
    assert ran(run(["dvc", "repro", "prepare"], repo, timeout=300)) == ["prepare"]
    report = json.loads((repo / "reports/prepare/report.json").read_text())
    assert report["rows_in"] == 13 and report["rows_per_class"]["tech"] == 5


def test_a_missing_source_fails_in_one_line(tmp_path):
    repo = new_repo(tmp_path, {"prepare": {"source": "bbc_news"}})  # the old spelling of the built-in
    result = run(
        [
            "python",
            "stages/prepare.py",
            "--out",
            "data/prepared",
            "--metrics",
            "m.json",
            "--report",
            "r.json",
        ],
        repo,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: prepare.source: bbc_news not found; the built-in corpus is named by its descriptor file, "
        "data/builtin/bbc_news.yaml"
    )
    assert not (repo / "data/prepared").exists()
    assert not (repo / "r.json").exists() and not (repo / "m.json").exists()
