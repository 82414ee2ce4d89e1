"""Which pipeline steps the WATCHER can run, and how ``--params`` become a step's CLI flags.

This project ships step 5 only; asking for any other step is a :class:`UsageError` (exit 64)
raised before anything runs.

Mapping rules (SPEC section 9): a ``--params`` key is the snake_case name of one of the
step's flags (``k_folds`` -> ``--k-folds``). Each key has one type and a wrong type is an
error naming the key; an unknown key is an error (with a "did you mean"), never dropped.

* ``int`` / ``float`` / ``str`` keys -> ``--flag VALUE``;
* on/off pairs (``normalize_features``) -> ``--normalize-features`` or ``--no-normalize-features``;
* store_true flags (``compare_models``) accept only booleans: ``true`` -> ``--compare-models``,
  ``false`` -> nothing;
* ``gpus`` accepts ``"0,1"`` or ``[0, 1]``.

``policy`` is not a params key: the WATCHER's own ``--policy`` is passed through, so the
step runs and is judged under the same file.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from step5.errors import UsageError
from step5.launch import OPTIMIZER_MODULE, module_command

MODEL_TYPES = ("neural_net", "xgboost", "lightgbm", "catboost")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_GPUS_RE = re.compile(r"^\d+(,\d+)*$")


@dataclass(frozen=True)
class ParamSpec:
    """One ``--params`` key of a step."""

    name: str  # snake_case key; the flag is --kebab-case of it
    kind: str  # int | float | str | bool_pair | store_true | gpus
    default: Any = None  # the step's own default (used for retry arithmetic), None = none
    always: bool = False  # pass the default even when the key is absent
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None  # extra range check on an already typed value
    expect: str = ""  # words for the error when ``check`` fails

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def to_argv(self, value: Any) -> list[str]:
        """The step's flags for an already validated value."""
        if self.kind == "store_true":
            return [self.flag] if value else []
        if self.kind == "bool_pair":
            return [self.flag] if value else ["--no-" + self.name.replace("_", "-")]
        return [self.flag, str(value)]


@dataclass(frozen=True)
class StepSpec:
    """A pipeline step the WATCHER can run and judge."""

    number: int
    name: str
    module: str  # run as ``python -P -m MODULE`` (step5.launch), so an installed package works
    params: tuple[ParamSpec, ...]
    acceptance_key: str  # section of ``acceptance_rules`` in the policy
    sidecar_name: str = "best_model.meta.json"
    reserved: dict[str, str] = field(default_factory=dict)  # key -> why it is not a params key

    def spec(self, key: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == key), None)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_STEP5 = StepSpec(
    number=5,
    name="anti_overfit_meta_optimizer",
    module=OPTIMIZER_MODULE,
    acceptance_key="step5",
    params=(
        ParamSpec("survivors", "str", "survivors_with_scores.json", always=True),
        ParamSpec("lottery_data", "str", "train_history.json", always=True),
        ParamSpec("model_type", "str", "neural_net", choices=MODEL_TYPES),
        ParamSpec("compare_models", "store_true", False),
        ParamSpec("trials", "int", 50, check=lambda v: v >= 1, expect="an int >= 1"),
        ParamSpec("k_folds", "int", 5, check=lambda v: v >= 2, expect="an int >= 2"),
        ParamSpec("test_holdout", "float", 0.2, check=lambda v: 0 < v < 1, expect="a number in (0, 1)"),
        ParamSpec("output_dir", "str", "models/reinforcement"),
        ParamSpec("study_name", "str"),
        ParamSpec("storage", "str"),
        ParamSpec("seed", "int", 42, check=lambda v: v >= 0, expect="a non-negative int"),
        ParamSpec("target", "str"),
        ParamSpec("persistent_workers", "bool_pair"),
        ParamSpec("gpus", "gpus"),
        ParamSpec("cpu_workers", "int", check=lambda v: v >= 1, expect="an int >= 1"),
        ParamSpec("normalize_features", "bool_pair", True),
        ParamSpec("use_leaky_relu", "bool_pair", True),
        ParamSpec("dropout", "float", check=lambda v: 0 <= v < 1, expect="a number in [0, 1)"),
        ParamSpec("enable_diagnostics", "store_true", False),
        ParamSpec("prng_type", "str"),
        ParamSpec("mod", "int", check=lambda v: v >= 1, expect="an int >= 1"),
        ParamSpec("holdout_draws", "int", check=lambda v: v >= 0, expect="a non-negative int"),
        ParamSpec("parent_run_id", "str"),
        ParamSpec("log_level", "str", choices=LOG_LEVELS),
    ),
    reserved={"policy": "use the watcher's own --policy PATH; it is passed through to the step"},
)

STEPS: dict[int, StepSpec] = {_STEP5.number: _STEP5}


def get_step(number: int) -> StepSpec:
    """The step ``number``, or a :class:`UsageError` saying which steps this project ships."""
    try:
        return STEPS[number]
    except KeyError:
        raise UsageError(
            f"step {number} is not shipped by this project; available steps: {sorted(STEPS)}"
        ) from None


def steps_in_range(start: int, end: int) -> list[StepSpec]:
    """Every step from ``start`` to ``end`` inclusive; all must exist before any runs."""
    if end < start:
        raise UsageError(f"--end-step {end} is before --start-step {start}")
    return [get_step(n) for n in range(start, end + 1)]


def _check_value(step: StepSpec, spec: ParamSpec, value: Any) -> Any:
    """Type-check one value; returns it normalised (``gpus`` list -> "0,1", int -> float)."""
    where = f"--params key `{spec.name}` (step {step.number} flag {spec.flag})"
    kind = spec.kind
    if kind in ("store_true", "bool_pair"):
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if not _is_int(value):
            raise UsageError(f"{where} must be an int, got {value!r}")
    elif kind == "float":
        if not _is_number(value):
            raise UsageError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise UsageError(f"{where} must be a non-empty string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise UsageError(f"{where} must be one of {list(spec.choices)}, got {value!r}")
    elif kind == "gpus":
        if isinstance(value, list) and value and all(_is_int(g) and g >= 0 for g in value):
            return ",".join(str(g) for g in value)
        if isinstance(value, str) and _GPUS_RE.match(value):
            return value
        raise UsageError(f'{where} must be a GPU list like "0,1" or [0, 1], got {value!r}')
    else:  # pragma: no cover - the table above is the only source of kinds
        raise AssertionError(f"unknown ParamSpec kind {kind!r}")
    if spec.check is not None and not spec.check(value):
        raise UsageError(f"{where} must be {spec.expect}, got {value!r}")
    return value


def validate_params(step: StepSpec, params: Any) -> dict[str, Any]:
    """Check a ``--params`` object against the step's flags; returns the normalised copy."""
    if not isinstance(params, dict):
        raise UsageError(f"--params must be a JSON object, got {type(params).__name__}")
    out: dict[str, Any] = {}
    known = [p.name for p in step.params]
    for key, value in params.items():
        if key in step.reserved:
            raise UsageError(f"--params key `{key}` is not accepted: {step.reserved[key]}")
        spec = step.spec(key)
        if spec is None:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise UsageError(
                f"unknown --params key `{key}` for step {step.number} ({step.name}){hint} "
                f"known keys: {', '.join(sorted(known))}"
            )
        out[key] = _check_value(step, spec, value)
    return out


def build_command(
    step: StepSpec,
    params: dict[str, Any],
    *,
    policy_path: str | os.PathLike[str],
    script: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The step's argv for validated ``params``; ``script`` replaces the real step (tests)."""
    argv = module_command(step.module, python) if script is None else [python, str(script)]
    for spec in step.params:
        if spec.name in params:
            argv += spec.to_argv(params[spec.name])
        elif spec.always:
            argv += spec.to_argv(spec.default)
    argv += ["--policy", str(policy_path)]
    return argv


def effective(step: StepSpec, params: dict[str, Any], key: str) -> Any:
    """The value the step will use for ``key``: the params value, else the step's default."""
    if key in params:
        return params[key]
    spec = step.spec(key)
    return spec.default if spec is not None else None


def retry_params(step: StepSpec, params: dict[str, Any], retry: int, *, trials_multiplier: float,
                 seed_increment: int) -> dict[str, Any]:
    """Params for retry number ``retry`` (1 = first re-run): more trials and a new seed, so a
    retry explores afresh instead of repeating the run that was rejected.

    A study is bound to its setup (seed included): Step 5's default study name follows the
    setup, so a new seed gets a new study by itself; a study name the user chose gets a
    ``_retryN`` suffix, since resuming it under another seed is refused (exit 64).
    """
    out = dict(params)
    if "study_name" in params:
        out["study_name"] = f"{params['study_name']}_retry{retry}"
    trials = effective(step, params, "trials")
    seed = effective(step, params, "seed")
    if trials is not None:
        out["trials"] = max(int(trials), math.ceil(trials * trials_multiplier ** retry))
    if seed is not None:
        out["seed"] = int(seed) + seed_increment * retry
    return out
