"""The skip registry and the decision log: counting, skipping, damage, concurrent writers."""
from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from step5.errors import DataError
from step5.policy import DiagnosticsPolicy
from step5.watcher.registry import (
    append_decision,
    check_writable,
    load_skip_registry,
    read_decisions,
    record_result,
    skip_until,
    skipped_model_types,
)


RULES = DiagnosticsPolicy()  # max_consecutive_critical 3, skip_duration_hours 24
NOW = datetime(2026, 2, 18, 16, 0, tzinfo=timezone.utc)


def test_missing_registry_is_empty(tmp_path):
    reg = load_skip_registry(tmp_path / "none.json")
    assert reg == {}
    assert skipped_model_types(reg, RULES) == {}


def test_default_path_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record_result("diagnostics_outputs/model_skip_registry.json", "xgboost", True, "bad", RULES)
    assert load_skip_registry()["xgboost"]["consecutive_critical"] == 1


def test_the_file_has_the_pipelines_shape(tmp_path):
    """training_health_check.py::_check_skip_registry reads and writes
    {model_type: {"consecutive_critical": n, "last_critical": iso}}; the existing optimizer's
    skip-registry block reads entry.get("consecutive_critical") per model type."""
    path = tmp_path / "reg.json"
    record_result(path, "catboost", True, "cv_r2 -0.1 < min_cv_r2 0", RULES)
    raw = json.loads(path.read_text())
    assert set(raw) == {"catboost"}
    entry = raw["catboost"]
    assert entry["consecutive_critical"] == 1
    assert datetime.fromisoformat(entry["last_critical"]).tzinfo is not None


def test_consecutive_criticals_count_and_an_ok_resets(tmp_path):
    path = tmp_path / "reg.json"
    for _ in range(2):
        entry = record_result(path, "catboost", True, "cv_r2 -0.1 < min_cv_r2 0", RULES)
    assert entry["consecutive_critical"] == 2 and not entry["skipped"]
    assert skipped_model_types(load_skip_registry(path), RULES) == {}  # below the limit
    entry = record_result(path, "catboost", True, "again", RULES)
    assert entry["skipped"] and entry["last_reason"] == "again"  # 3 >= max_consecutive_critical 3
    assert set(skipped_model_types(load_skip_registry(path), RULES)) == {"catboost"}
    lenient = DiagnosticsPolicy(max_consecutive_critical=4)
    assert skipped_model_types(load_skip_registry(path), lenient) == {}  # the policy decides, not the file
    entry = record_result(path, "catboost", False, "accepted", RULES)
    assert entry["consecutive_critical"] == 0 and entry["total_runs"] == 4 and entry["total_critical"] == 3
    assert skipped_model_types(load_skip_registry(path), RULES) == {}


def test_a_skip_ends_after_the_policys_duration():
    registry = {"xgboost": {"consecutive_critical": 3, "last_critical": "2026-02-18T10:00:00+00:00"}}
    rules = DiagnosticsPolicy(skip_duration_hours=8)
    assert "until 2026-02-18T18:00:00+00:00" in skipped_model_types(registry, rules, NOW)["xgboost"]
    assert skipped_model_types(registry, rules, NOW + timedelta(hours=2)) == {}
    assert skip_until(registry["xgboost"], rules) == datetime(2026, 2, 18, 18, tzinfo=timezone.utc)


def test_an_entry_over_the_limit_without_a_time_stays_skipped():
    registry = {"lightgbm": {"consecutive_critical": 5}}
    assert "with no end" in skipped_model_types(registry, RULES, NOW)["lightgbm"]


@pytest.mark.parametrize("hours, last", [(1e300, "2026-02-18T10:00:00+00:00"), (24, "9999-12-31T10:00:00+00:00")])
def test_a_skip_that_would_end_past_the_year_9999_never_ends(hours, last):
    # A skip_duration_hours meant as "for ever", or a last_critical written far ahead, used to raise
    # OverflowError out of timedelta or the addition: a traceback from `--status` and from compare runs.
    registry = {"catboost": {"consecutive_critical": 3, "last_critical": last}}
    rules = DiagnosticsPolicy(skip_duration_hours=hours)
    assert skip_until(registry["catboost"], rules) == datetime.max.replace(tzinfo=timezone.utc)
    reason = skipped_model_types(registry, rules, NOW)["catboost"]
    assert "skipped with no end;" in reason and "no last_critical time" not in reason


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"xgboost": []}', "`xgboost` must be an object"),
        ('{"xgboost": {"consecutive_critical": -1}}', "xgboost.consecutive_critical"),
        ('{"xgboost": {"consecutive_critical": 1, "last_critical": "yesterday"}}', "xgboost.last_critical"),
    ],
)
def test_damaged_registry_is_a_clear_error(tmp_path, content, words):
    path = tmp_path / "reg.json"
    path.write_text(content)
    with pytest.raises(DataError, match="skip registry") as info:
        load_skip_registry(path)
    assert words in str(info.value)
    with pytest.raises(DataError):
        record_result(path, "xgboost", True, "x", RULES)  # never silently overwritten
    assert path.read_text() == content


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        record_result(tmp_path / "r.json", "", True, "x", RULES)
    with pytest.raises(ValueError, match="critical"):
        record_result(tmp_path / "r.json", "xgboost", "yes", "x", RULES)


def _hammer_registry(path: str, model_type: str, n: int) -> None:
    for i in range(n):
        record_result(path, model_type, i % 2 == 0, f"{model_type} #{i}", RULES)


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
    assert reg["xgboost"]["total_runs"] == 30
    assert reg["catboost"]["total_runs"] == 15
    assert reg["lightgbm"]["total_critical"] == 8
    assert not list((tmp_path / "diag").glob("*.tmp"))  # no temp file left behind


def test_decision_log_appends_whole_lines_under_concurrency(tmp_path):
    path = str(tmp_path / "log" / "decisions.jsonl")
    _run_concurrently(_hammer_log, [(path, w, 25) for w in range(4)])
    lines = Path(path).read_text(encoding="utf-8").splitlines()
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


def test_a_decision_the_disk_refuses_midline_leaves_no_half_line_to_swallow_the_next(tmp_path, file_size_limit):
    path = tmp_path / "d.jsonl"
    append_decision(path, {"n": 1})
    before = path.read_bytes()
    with file_size_limit(len(before) + 100), pytest.raises(DataError, match="file too large"):
        append_decision(path, {"n": 2, "stderr_tail": "x" * 5000})  # the first 100 bytes fit
    assert path.read_bytes() == before
    append_decision(path, {"n": 3})  # room again
    assert read_decisions(path) == ([{"n": 1}, {"n": 3}], 0)


def test_a_log_ending_midline_does_not_swallow_the_next_decision(tmp_path):
    # A log cut off mid-line (an older writer killed, a copy cut short, a hand edit): the next record
    # was glued to the fragment, and --status showed "0 decision(s), 1 unreadable line(s)".
    path = tmp_path / "d.jsonl"
    append_decision(path, {"n": 1})
    with path.open("ab") as fh:
        fh.write(b'{"timestamp": "x", "decision": "PROC')
    append_decision(path, {"n": 2})
    append_decision(path, {"n": 3})
    assert read_decisions(path) == ([{"n": 1}, {"n": 2}, {"n": 3}], 1)


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
    # `--status --last 99999999999999999999`: past what a deque holds (was an OverflowError traceback)
    assert read_decisions(path, last=10**20) == ([{"n": n} for n in range(6)], 2)


def test_files_that_cannot_be_written_or_read_are_data_errors_naming_them(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "plain").write_text("a file where a folder should be")
    with pytest.raises(DataError, match=r"cannot open the decision log .*folder.jsonl: Is a directory"):
        append_decision(tmp_path / "folder.jsonl", {"n": 1})
    with pytest.raises(DataError, match=r"cannot read the decision log .*folder.jsonl: Is a directory"):
        read_decisions(tmp_path / "folder.jsonl")
    with pytest.raises(DataError, match=r"cannot open the skip registry .*plain/reg.json: "):
        record_result(tmp_path / "plain" / "reg.json", "xgboost", True, "x", RULES)
    with pytest.raises(DataError, match=r"cannot open the decision log .*folder.jsonl"):
        check_writable(tmp_path / "folder.jsonl", tmp_path / "reg.json")
    with pytest.raises(DataError, match=r"cannot open the skip registry .*plain/reg.json: "):
        check_writable(tmp_path / "d.jsonl", tmp_path / "plain" / "reg.json")
    check_writable(tmp_path / "new" / "d.jsonl", tmp_path / "new" / "reg.json")
    assert read_decisions(tmp_path / "new" / "d.jsonl") == ([], 0)  # made empty, as the first append would
    assert load_skip_registry(tmp_path / "new" / "reg.json") == {}  # only its lock is made
