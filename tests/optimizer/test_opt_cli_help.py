"""`--help` as a new user reads it: every real default once, an example, the input format."""
from __future__ import annotations

import re
import subprocess

from step5.launch import OPTIMIZER_MODULE, child_environment, module_command
from step5.optimizer.cli import build_parser


def _help(prog: str = "step5-optimize") -> str:
    return build_parser(prog).format_help()


def test_no_argparse_default_noise():
    text = _help()
    assert "(default:" not in text
    assert "None" not in text


def _rendered(parser, action) -> str:
    return parser._get_formatter()._expand_help(action)


def test_each_real_default_appears_once_beside_its_flag():
    parser = build_parser("step5-optimize")
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for flag, shown in (("--model-type", "[neural_net]"), ("--trials", "[50]"), ("--k-folds", "[5]"),
                        ("--test-holdout", "[0.2]"), ("--seed", "[42]"), ("--output-dir", "[models/reinforcement]"),
                        ("--normalize-features", "[on]"), ("--use-leaky-relu", "[on]"), ("--log-level", "[INFO]"),
                        ("--nn-max-epochs", "[200]"), ("--target", "[holdout_quality]")):
        assert _rendered(parser, by_flag[flag]).endswith(shown), flag
    for flag, action in by_flag.items():  # no flag names a default twice
        if action.help:
            assert not re.search(r"\] \[[^\]]*\]$", _rendered(parser, action)), flag


def test_example_command_and_input_format_in_one_line_each():
    lines = _help().splitlines()
    example = [line for line in lines if line.strip().startswith("step5-optimize --survivors")]
    assert len(example) == 1 and "--lottery-data" in example[0]
    inputs = [line for line in lines if line.startswith("input:")]
    assert len(inputs) == 1
    assert '"features"' in inputs[0] and "holdout_quality" in inputs[0] and '"draw"' in inputs[0]


def test_the_example_uses_the_name_the_user_typed():
    proc = subprocess.run([*module_command(OPTIMIZER_MODULE), "--help"], capture_output=True, text=True,
                          timeout=120, env=child_environment())
    assert proc.returncode == 0
    assert "\n  python -m step5.optimizer --survivors survivors_with_scores.json" in proc.stdout
