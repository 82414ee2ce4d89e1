"""Which pipeline steps the WATCHER can run (step 5 only), and how ``--params`` become a
step's flags: the keys, types, choices and command checks are the step's own parser's, so the
WATCHER refuses exactly what the step would, before it runs (docs/watcher.md "--params").
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step5.artifacts import HISTORY_FILENAME, PIPELINE_STEP, PIPELINE_STEP_NAME, SURVIVORS_FILENAME
from step5.errors import DataError, UsageError
from step5.jsonio import MAX_INT, read_json_file
from step5.launch import OPTIMIZER_MODULE, module_command
from step5.policy import WatcherPolicy

SWITCH = "switch"  # store_true / store_const: true -> --flag, false -> nothing
ON_OFF = "on_off"  # BooleanOptionalAction: true -> --flag, false -> --no-flag
VALUE = "value"  # takes a value: --flag=VALUE (so a value starting with "-" stays a value)
#: Where the existing pipeline keeps its agents' manifests, relative to its root.
MANIFESTS_DIR = "agent_manifests"


@dataclass(frozen=True)
class ParamSpec:
    """One ``--params`` key: one long option of the step's parser."""

    name: str  # snake_case key
    flag: str  # the option string the key turns into, e.g. "--k-folds"
    kind: str  # SWITCH | ON_OFF | VALUE
    dest: str  # where the step stores it; an alias shares its flag's dest
    default: Any  # the step's own default (for retry arithmetic and output_dir)
    always: Any  # a value passed even when the key is absent (the step requires the flag)
    action: argparse.Action = field(compare=False, repr=False)  # its type and choices check a value

    def to_argv(self, value: Any) -> list[str]:
        if self.kind == SWITCH:
            return [self.flag] if value else []
        if self.kind == ON_OFF:
            return [self.flag] if value else ["--no-" + self.flag[2:]]
        return [f"{self.flag}={_as_text(value)}"]


@dataclass(frozen=True)
class StepSpec:
    """A pipeline step the WATCHER can run and judge; its parser and command checks are the step's own."""

    number: int
    name: str
    module: str  # run as ``python -P -m MODULE`` (step5.launch), so an installed package works
    acceptance_key: str  # section of ``acceptance_rules`` in the policy
    required_defaults: dict[str, Any] = field(default_factory=dict)  # values for flags the step requires
    reserved: dict[str, str] = field(default_factory=dict)  # key -> why it is not a params key
    manifest: str | None = None  # the pipeline's manifest of this step, under MANIFESTS_DIR

    @functools.cached_property
    def parser(self) -> argparse.ArgumentParser:
        from step5.optimizer.cli import build_parser

        return build_parser()

    @functools.cached_property
    def params(self) -> tuple[ParamSpec, ...]:
        return params_from_parser(self.parser, reserved=self.reserved, required_defaults=self.required_defaults)

    def spec(self, key: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == key), None)


def params_from_parser(
    parser: argparse.ArgumentParser, *, reserved: dict[str, str], required_defaults: dict[str, Any]
) -> tuple[ParamSpec, ...]:
    """One :class:`ParamSpec` per long option of ``parser`` (``--no-x`` is the ``x`` key's false)."""
    specs: list[ParamSpec] = []
    for action in parser._actions:  # argparse offers no public walk over its actions
        if isinstance(action, argparse._HelpAction) or action.dest == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            kind = ON_OFF
        else:
            kind = SWITCH if action.nargs == 0 else VALUE
        for flag in action.option_strings:
            name = flag[2:].replace("-", "_")
            if not flag.startswith("--") or (kind == ON_OFF and flag.startswith("--no-")) or name in reserved:
                continue
            if action.required and name not in required_defaults:
                raise AssertionError(f"step flag {flag} is required but the WATCHER has no value for it")
            specs.append(ParamSpec(name, flag, kind, action.dest, action.default,
                                   required_defaults.get(name) if action.required else None, action))
    return tuple(specs)


STEPS: dict[int, StepSpec] = {PIPELINE_STEP: StepSpec(
    number=PIPELINE_STEP,
    name=PIPELINE_STEP_NAME,
    module=OPTIMIZER_MODULE,
    acceptance_key="step5",
    # The proposal's Test 4 passes neither; these are the pipeline's file names.
    required_defaults={"survivors": SURVIVORS_FILENAME, "lottery_data": HISTORY_FILENAME},
    reserved={"policy": "use the watcher's own --policy PATH; it is passed through to the step"},
    manifest="reinforcement.json",
)}


def manifest_defaults(step: StepSpec, root: str | os.PathLike[str] = ".") -> tuple[dict[str, Any], Path | None]:
    """The step's ``default_params`` from the pipeline's manifest, as the existing WATCHER
    passes them (false and null values add no flag, so they are left out), and the file
    they came from; ``({}, None)`` when there is none. An unreadable manifest is a usage error naming it."""
    path = Path(root) / MANIFESTS_DIR / step.manifest if step.manifest else None
    if path is None or not path.is_file():
        return {}, None
    try:
        manifest = read_json_file(path, "manifest")
    except DataError as exc:
        raise UsageError(str(exc)) from None
    defaults = manifest.get("default_params", {}) if isinstance(manifest, dict) else None
    if not isinstance(defaults, dict):
        raise UsageError(f"manifest {path}: `default_params` must be an object, got {type(defaults).__name__}")
    return {k: v for k, v in defaults.items() if v is not None and v is not False}, path


def _did_you_mean(step: StepSpec, key: Any) -> str:
    """The "; did you mean" hint for a key that is not one of the step's flags ("" when none is close)."""
    close = difflib.get_close_matches(str(key).replace("-", "_"), [p.name for p in step.params], n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def merge_manifest_defaults(step: StepSpec, defaults: dict[str, Any], params: dict[str, Any],
                            source: str) -> tuple[dict[str, Any], list[str]]:
    """``params`` over the manifest's ``defaults``, and the manifest keys they override. A params key
    overrides the manifest's key for the same step setting under another name too (``fuse_folds``
    over the manifest's ``enable_vmap``), as it does the same key: two names of one flag are not two
    requests to reconcile. A manifest value the step would refuse is an error naming ``source``."""
    given = {spec.dest for key in params if (spec := step.spec(key)) is not None}
    overridden, kept = [], {}
    for key, value in defaults.items():
        spec = step.spec(key)
        if key in params or (spec is not None and spec.dest in given):
            overridden.append(key)
            continue
        if spec is None:
            raise UsageError(f"{source}: key `{key}` is not a step {step.number} flag{_did_you_mean(step, key)}")
        _check_value(step, spec, value, source=source)
        kept[key] = value
    return {**kept, **params}, sorted(overridden)


def get_step(number: int) -> StepSpec:
    try:
        return STEPS[number]
    except KeyError:
        raise UsageError(f"step {number} is not shipped by this project; available steps: {sorted(STEPS)}") from None


def steps_in_range(start: int, end: int) -> list[StepSpec]:
    """Every step from ``start`` to ``end`` inclusive; all must exist before any runs."""
    if end < start:
        raise UsageError(f"--end-step {end} is before --start-step {start}")
    return [get_step(n) for n in range(start, end + 1)]


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def _as_text(value: Any) -> str:
    """A JSON value as the step's command line spells it (lists joined with commas)."""
    if isinstance(value, list):
        return ",".join(_as_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _check_value(step: StepSpec, spec: ParamSpec, value: Any, source: str = "--params") -> tuple[Any, Any]:
    """Check one value with the step's own argparse type and choices. Returns the value (a
    list turned into its comma-joined text) and what it sets the step's ``dest`` to (None
    when a false switch sets nothing). ``source``: where the value came from, for the message."""
    where = f"{source} key `{spec.name}` (step {step.number} flag {spec.flag})"
    action = spec.action
    if spec.kind in (SWITCH, ON_OFF):
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value, value if spec.kind == ON_OFF else (action.const if value else None)
    if isinstance(value, list) and value and all(_is_scalar(v) for v in value):
        value = _as_text(value)
    if not _is_scalar(value):
        raise UsageError(f"{where} takes a string or a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{where} must be a finite number, got {value!r}")
    converted = text = _as_text(value)
    if not text.strip():
        raise UsageError(f"{where} must not be empty")
    if "\0" in text:  # JSON can carry one, a command line cannot: starting the step would raise ValueError
        raise UsageError(f"{where} must not contain a NUL character, got {value!r}")
    if action.type is not None:
        try:
            converted = action.type(text)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise UsageError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return value, converted


def _check_with_step(step: StepSpec, argv: list[str]) -> None:
    """Parse ``argv`` with the step's own parser and config checks, so that a combination the
    step refuses (``k_folds`` 1, ``device`` with ``gpus``) is refused here."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = step.parser.parse_args(argv)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        raise UsageError(f"--params give step {step.number} a command it refuses: "
                         f"{lines[-1] if lines else 'usage error'}") from None
    from step5.optimizer.cli import config_from_args  # raises the UsageError step 5 would exit 64 with

    try:
        config_from_args(args, argv)
    except UsageError as exc:
        raise UsageError(f"--params give step {step.number} a command it refuses: {exc}") from None


def validate_params(step: StepSpec, params: Any, *,
                    policy_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check a ``--params`` object against the step's flags; returns the normalised copy.
    ``policy_path``: the policy the step will run under (checked with the command). A null
    value means "not set"; an unknown key is an error with a "did you mean"."""
    if not isinstance(params, dict):
        raise UsageError(f"--params must be a JSON object, got {type(params).__name__}")
    out: dict[str, Any] = {}
    set_by: dict[str, tuple[str, Any]] = {}  # dest -> (key, value it sets): aliases must agree
    for key, value in params.items():
        if value is None and (key in step.reserved or step.spec(key) is not None):
            continue
        if key in step.reserved:
            raise UsageError(f"--params key `{key}` is not accepted: {step.reserved[key]}")
        spec = step.spec(key)
        if spec is None:
            raise UsageError(f"unknown --params key `{key}` for step {step.number} ({step.name})"
                             f"{_did_you_mean(step, key)} known keys: {', '.join(sorted(p.name for p in step.params))}")
        out[key], effect = _check_value(step, spec, value)
        if effect is not None:
            other = set_by.setdefault(spec.dest, (key, effect))
            if other[1] != effect:
                raise UsageError(f"--params keys `{other[0]}` and `{key}` set the same step {step.number} "
                                 f"setting to different values; give one of them")
    _check_with_step(step, _flags(step, out) + (["--policy", str(policy_path)] if policy_path is not None else []))
    return out


def _flags(step: StepSpec, params: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for spec in step.params:
        if spec.name in params:
            argv += spec.to_argv(params[spec.name])
        elif spec.always is not None:
            argv += spec.to_argv(spec.always)
    return argv


def build_command(step: StepSpec, params: dict[str, Any], *, policy_path: str | os.PathLike[str],
                  script: str | os.PathLike[str] | None = None, python: str = sys.executable) -> list[str]:
    """The step's argv for validated ``params``; ``script`` replaces the real step (tests)."""
    argv = module_command(step.module, python) if script is None else [python, str(script)]
    return argv + _flags(step, params) + ["--policy", str(policy_path)]


def effective(step: StepSpec, params: dict[str, Any], key: str) -> Any:
    """The value the step will use for ``key``: the params value, else the step's default."""
    if key in params:
        return params[key]
    spec = step.spec(key)
    return spec.default if spec is not None else None


def retry_params(step: StepSpec, params: dict[str, Any], retry: int, watcher: WatcherPolicy) -> dict[str, Any]:
    """Params for retry number ``retry`` (1 = first re-run): more trials and a new seed (by the
    policy's ``watcher`` section), so a retry explores afresh. A study name the user chose gets a ``_retryN`` suffix, since
    step 5 refuses to resume a study under another seed (its default name follows the seed)."""
    from step5.optimizer.config import MAX_SEED

    out = dict(params)
    if "study_name" in params:
        out["study_name"] = f"{params['study_name']}_retry{retry}"
    trials = effective(step, params, "trials")
    seed = effective(step, params, "seed")
    if trials is not None:  # an int, or its text: the step's own type accepts both
        try:  # the float grows past 1.8e308 within a few retries of a big multiplier (OverflowError)
            grown = math.ceil(int(trials) * watcher.retry_trials_multiplier ** retry)
        except OverflowError:
            grown = MAX_INT
        # ... and no more than the step takes (a float near 2**63 rounds past it): a step refusing
        # its retry's --trials exits 64, and a bigger int crashed the decision log's JSON writer
        out["trials"] = min(MAX_INT, max(int(trials), grown))
    if seed is not None:  # past the step's largest seed it wraps: any other seed explores afresh
        out["seed"] = (int(seed) + watcher.retry_seed_increment * retry) % (MAX_SEED + 1)
    return out

