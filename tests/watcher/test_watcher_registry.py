"""The skip registry and the decision log: counting, skipping, damage, concurrent writers."""
from __future__ import annotations

import json
import multiprocessing

import pytest

from step5.errors import DataError
from step5.watcher.decision_log import append_decision, read_decisions
from step5.watcher.registry import (
    load_skip_registry,
    record_result,
    skipped_model_types,
)


def test_missing_registry_is_empty(tmp_path):
    reg = load_skip_registry(tmp_path / "none.json")
    assert reg["models"] == {}
    assert skipped_model_types(reg, 3) == set()


def test_default_path_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record_result("diagnostics_outputs/model_skip_registry.json", "xgboost", True, "bad", 3)
    assert load_skip_registry()["models"]["xgboost"]["consecutive_critical"] == 1


def test_consecutive_criticals_count_and_an_ok_resets(tmp_path):
    path = tmp_path / "reg.json"
    for _ in range(3):
        entry = record_result(path, "catboost", True, "cv_r2 -0.1 < min_cv_r2 0", 3)
    assert entry["consecutive_critical"] == 3 and not entry["skipped"]
    assert skipped_model_types(load_skip_registry(path), 3) == set()  # at the limit, not over it
    entry = record_result(path, "catboost", True, "again", 3)
    assert entry["skipped"] and entry["last_reason"] == "again"
    assert skipped_model_types(load_skip_registry(path), 3) == {"catboost"}
    assert skipped_model_types(load_skip_registry(path), 4) == set()  # the policy decides, not the file
    entry = record_result(path, "catboost", False, "accepted", 3)
    assert entry["consecutive_critical"] == 0 and entry["total_runs"] == 5 and entry["total_critical"] == 4
    assert skipped_model_types(load_skip_registry(path), 3) == set()


def test_limit_zero_skips_after_the_first_critical(tmp_path):
    path = tmp_path / "reg.json"
    record_result(path, "lightgbm", False, "ok", 0)
    assert skipped_model_types(load_skip_registry(path), 0) == set()
    record_result(path, "lightgbm", True, "bad", 0)
    assert skipped_model_types(load_skip_registry(path), 0) == {"lightgbm"}


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"schema_version": 2, "models": {}}', "schema_version"),
        ('{"schema_version": 1, "models": []}', "`models` must be an object"),
        ('{"schema_version": 1, "models": {"xgboost": {"consecutive_critical": -1}}}', "models.xgboost.consecutive_critical"),
    ],
)
def test_damaged_registry_is_a_clear_error(tmp_path, content, words):
    path = tmp_path / "reg.json"
    path.write_text(content)
    with pytest.raises(DataError, match="skip registry") as info:
        load_skip_registry(path)
    assert words in str(info.value)
    with pytest.raises(DataError):
        record_result(path, "xgboost", True, "x", 3)  # never silently overwritten
    assert path.read_text() == content


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        record_result(tmp_path / "r.json", "", True, "x", 3)
    with pytest.raises(ValueError, match="critical"):
        record_result(tmp_path / "r.json", "xgboost", "yes", "x", 3)
    with pytest.raises(ValueError, match="max_consecutive_critical"):
        skipped_model_types({"models": {}}, -1)


def _hammer_registry(path: str, model_type: str, n: int) -> None:
    for i in range(n):
        record_result(path, model_type, i % 2 == 0, f"{model_type} #{i}", 3)


def _hammer_log(path: str, writer: int, n: int) -> None:
    for i in range(n):
        append_decision(path, {"writer": writer, "i": i, "pad": "x" * 2000})


def _run_concurrently(target, args_list) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_concurrent_writers_lose_no_update(tmp_path):
    path = str(tmp_path / "diag" / "reg.json")
    _run_concurrently(_hammer_registry, [(path, m, 15) for m in ("xgboost", "xgboost", "catboost", "lightgbm")])
    reg = load_skip_registry(path)
    assert reg["models"]["xgboost"]["total_runs"] == 30
    assert reg["models"]["catboost"]["total_runs"] == 15
    assert reg["models"]["lightgbm"]["total_critical"] == 8
    assert not list((tmp_path / "diag").glob("*.tmp"))  # no temp file left behind


def test_decision_log_appends_whole_lines_under_concurrency(tmp_path):
    path = str(tmp_path / "log" / "decisions.jsonl")
    _run_concurrently(_hammer_log, [(path, w, 25) for w in range(4)])
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == 100
    records = [json.loads(line) for line in lines]
    for w in range(4):  # each writer's records are all there, in its order
        assert [r["i"] for r in records if r["writer"] == w] == list(range(25))


def test_decision_log_is_appended_never_rewritten(tmp_path):
    path = tmp_path / "d.jsonl"
    append_decision(path, {"decision": "PROCEED", "n": 1})
    first = path.read_bytes()
    append_decision(path, {"decision": "RETRY", "n": 2})
    assert path.read_bytes().startswith(first)


def test_read_decisions_tail_and_damaged_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    for n in range(5):
        append_decision(path, {"n": n})
    with path.open("a") as fh:
        fh.write("{torn line\n[1, 2]\n\n")
    append_decision(path, {"n": 5})
    records, bad = read_decisions(path, last=3)
    assert [r["n"] for r in records] == [3, 4, 5] and bad == 2
    assert read_decisions(tmp_path / "missing.jsonl") == ([], 0)
