"""The tree libraries are the optional `trees` extra: without one, a run that needs it
stops before loading data, with one line naming the library and the extra."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from step5.errors import MissingDependency
from step5.models import trees
from step5.optimizer.cli import main


@pytest.fixture
def uninstall(monkeypatch):
    """``uninstall("xgboost")`` makes the library look absent, as in an install without the extra."""
    real = importlib.util.find_spec
    gone: set[str] = set()

    def find_spec(name: str, *args, **kwargs):
        return None if name in gone else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return gone.update


def test_a_neural_net_run_needs_no_tree_library(uninstall):
    uninstall(trees.TREE_MODEL_TYPES)
    trees.require_libraries(["neural_net"])


def test_missing_libraries_are_named_with_the_extra(uninstall):
    uninstall({"xgboost", "catboost"})
    with pytest.raises(MissingDependency) as info:
        trees.require_libraries(["neural_net", "xgboost", "lightgbm", "catboost"])
    message = str(info.value)
    assert "xgboost, catboost are not installed" in message
    assert "lightgbm" not in message
    assert "step5[trees]" in message


@pytest.mark.parametrize("flags", [["--model-type", "lightgbm"], ["--compare-models"]])
def test_the_cli_stops_before_reading_any_input(uninstall, capsys, tmp_path: Path, flags):
    uninstall({"lightgbm"})
    code = main(["--survivors", str(tmp_path / "absent.json"), "--lottery-data", str(tmp_path / "absent2.json"),
                 "--output-dir", str(tmp_path / "out"), *flags])
    assert code == 1
    err = capsys.readouterr().err
    assert "lightgbm is not installed" in err and "step5[trees]" in err
    assert "absent.json" not in err  # the inputs were never opened
    assert not (tmp_path / "out").exists()


def test_loading_a_checkpoint_without_its_library(uninstall, tmp_path: Path):
    checkpoint = tmp_path / "best_model.cbm"
    checkpoint.write_bytes(b"not read")
    uninstall({"catboost"})
    with pytest.raises(MissingDependency, match="catboost is not installed"):
        trees.load_model(checkpoint, "catboost")
