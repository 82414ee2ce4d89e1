"""The worker protocol's message shapes (step5.protocol, SPEC section 6): requests round-trip
through their wire form and through the framing, and every malformed field is refused with
a BadRequest that names it and keeps what identifies the job. The dispatcher's handling of
whole lines (bad JSON, unknown or missing commands) is tested in tests/nn/test_worker_dispatch.py."""
from __future__ import annotations

import io
import math

import pytest

from step5.errors import BadRequest, JobError
from step5.framing import LineReader, LineWriter
from step5.jsonio import dumps_line, loads
from step5.protocol import (
    AUTO_FULL_BATCH_MAX_ROWS,
    BATCH_MODES,
    COMMANDS,
    FUSE_KEYS,
    OPTIMIZERS,
    Heartbeat,
    MergeRequest,
    NNParams,
    Ping,
    Shutdown,
    TrainFolds,
    TrainRequest,
    batch_plan,
    decode_request,
    fusion_key,
    resolve_batch_mode,
)
from step5.testing import train_line

CUSTOM_PARAMS = NNParams(hidden_layers=(64, 32, 8), learning_rate=0.02, dropout=0.0, epochs=7, weight_decay=1e-4,
                         optimizer="sgd", batch_size=17, early_stopping_patience=0, gradient_clip=0.0)

REQUESTS = [
    TrainRequest("/tmp/fold.npz"),
    TrainRequest("/tmp/fold_1.npz", CUSTOM_PARAMS, trial_number=4, fold_idx=1, normalize_features=False,
                 use_leaky_relu=False, batch_mode="mini", seed=2**63 - 1, job_id="t4-f1"),
    TrainRequest("fold.npz", NNParams(optimizer="adamw"), trial_number=0, fold_idx=0, batch_mode="full", job_id=9,
                 save_model_path="/tmp/out/best_model.pth"),
]


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("request_", REQUESTS, ids=["defaults", "every-field", "save-model"])
def test_a_train_request_round_trips_through_its_wire_form(request_):
    wire = request_.to_dict()
    assert wire["command"] == "train" and wire["X_train_path"] == request_.data_path
    assert TrainRequest.from_dict(wire) == request_


@pytest.mark.parametrize("params", [NNParams(), CUSTOM_PARAMS, NNParams(hidden_layers=())],
                         ids=["defaults", "custom", "linear"])
def test_params_round_trip_and_travel_as_plain_json(params):
    wire = params.to_dict()
    assert isinstance(wire["hidden_layers"], list)
    assert NNParams.from_dict(wire) == params


def test_requests_round_trip_through_the_framing_one_line_each():
    stream = io.BytesIO()
    writer = LineWriter(stream)
    for request in REQUESTS:
        writer.write_message(request.to_dict())
    for message in (Ping(7), Heartbeat("beat#1"), Shutdown()):
        writer.write_message(message.to_dict())
    writer.write_message(TrainFolds(tuple(REQUESTS[:2])).to_dict())
    stream.seek(0)
    reader = LineReader(stream)
    lines = []
    while (line := reader.read_line()) is not None:
        lines.append(loads(line))
    assert [TrainRequest.from_dict(raw) for raw in lines[:3]] == REQUESTS
    assert [decode_request(raw) for raw in lines[3:6]] == [Ping(7), Heartbeat("beat#1"), Shutdown()]
    assert decode_request(lines[6]) == TrainFolds(tuple(REQUESTS[:2]))
    assert len(lines) == 7


def test_absent_optional_fields_take_the_documented_defaults():
    request = TrainRequest.from_dict({"command": "train", "X_train_path": "f.npz"})
    assert request == TrainRequest("f.npz")
    assert (request.params, request.normalize_features, request.use_leaky_relu, request.batch_mode, request.seed) == (
        NNParams(), True, True, "auto", 0)
    assert request.trial_number is None and request.fold_idx is None and request.job_id is None


def test_int_valued_floats_are_stored_as_floats():
    params = NNParams.from_dict({"learning_rate": 1, "dropout": 0, "weight_decay": 0, "gradient_clip": 2})
    assert all(isinstance(getattr(params, k), float) for k in ("learning_rate", "dropout", "weight_decay", "gradient_clip"))


MESSAGES = [*REQUESTS, TrainFolds(tuple(REQUESTS)), Ping(), Ping("p1"), Heartbeat(3), Shutdown(),
            MergeRequest(("/t/f0.pth", "/t/f1.pth"), "/t/best_model.pth", "/t/final.npz", trial_number=5, job_id="m")]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_request_type_round_trips_through_the_one_decoder(message):
    wire = message.to_dict()
    assert wire["command"] == message.command
    assert decode_request(loads(dumps_line(wire))) == message


def test_the_command_vocabulary():
    assert set(COMMANDS) == {"train", "train_folds", "merge", "ping", "heartbeat", "shutdown"}
    assert set(OPTIMIZERS) == {"adam", "adamw", "sgd"} and set(BATCH_MODES) == {"auto", "full", "mini"}


# --- refusals --------------------------------------------------------------------------------

BAD_PARAMS = [
    ([], "`params` must be a JSON object, got list"),
    ("adam", "`params` must be a JSON object, got str"),
    ({"hidden_layer": [8]}, "unknown key(s) in `params`: ['hidden_layer']"),
    ({"hidden_layers": [8, 0]}, "`hidden_layers` must be a list of positive ints (empty: a linear model), got [8, 0]"),
    ({"hidden_layers": [8.0]}, "`hidden_layers` must be a list of positive ints (empty: a linear model)"),
    ({"hidden_layers": [True]}, "`hidden_layers` must be a list of positive ints (empty: a linear model)"),
    ({"hidden_layers": 128}, "`hidden_layers` must be a list of positive ints (empty: a linear model), got 128"),
    ({"hidden_layers": "128,64"}, "`hidden_layers` must be a list of positive ints (empty: a linear model)"),
    ({"learning_rate": 0}, "`learning_rate` must be a finite number > 0.0, got 0"),
    ({"learning_rate": -0.1}, "`learning_rate` must be a finite number > 0.0"),
    ({"learning_rate": math.inf}, "`learning_rate` must be a finite number > 0.0, got inf"),
    ({"learning_rate": math.nan}, "`learning_rate` must be a finite number > 0.0, got nan"),
    ({"learning_rate": "0.001"}, "`learning_rate` must be a finite number > 0.0, got '0.001'"),
    ({"learning_rate": True}, "`learning_rate` must be a finite number > 0.0, got True"),
    ({"learning_rate": 10**400}, "`learning_rate` must be a finite number > 0.0, got 1000"),  # beyond float64
    ({"weight_decay": -(10**400)}, "`weight_decay` must be a finite number >= 0.0, got -1000"),
    ({"dropout": 1.0}, "`dropout` must be a finite number >= 0.0 and < 1.0, got 1.0"),
    ({"dropout": -0.1}, "`dropout` must be a finite number >= 0.0 and < 1.0"),
    ({"weight_decay": -1e-5}, "`weight_decay` must be a finite number >= 0.0"),
    ({"gradient_clip": None}, "`gradient_clip` must be a finite number >= 0.0, got None"),
    ({"epochs": 0}, "`epochs` must be an int >= 1, got 0"),
    ({"epochs": 10.0}, "`epochs` must be an int >= 1, got 10.0"),
    ({"epochs": False}, "`epochs` must be an int >= 1, got False"),
    ({"batch_size": 0}, "`batch_size` must be an int >= 1, got 0"),
    ({"early_stopping_patience": -1}, "`early_stopping_patience` must be an int >= 0, got -1"),
    ({"optimizer": "rmsprop"}, "`optimizer` must be one of ['adam', 'adamw', 'sgd'], got 'rmsprop'"),
    ({"optimizer": "Adam"}, "`optimizer` must be one of"),
]


@pytest.mark.parametrize("params, message", BAD_PARAMS, ids=[m[:40] for _, m in BAD_PARAMS])
def test_bad_params_are_refused_naming_the_field(params, message):
    with pytest.raises(BadRequest) as info:
        NNParams.from_dict(params)
    assert message in str(info.value)
    # The same refusal reaches a whole request, tagged with the job it belongs to.
    with pytest.raises(BadRequest) as info:
        TrainRequest.from_dict(train_line(params=params))
    assert message in str(info.value)
    assert (info.value.trial_number, info.value.fold_idx, info.value.job_id) == (3, 1, "t3-f1")


BAD_REQUESTS = [
    (train_line(X_train_path=None), "`X_train_path` must be a non-empty string, got None"),
    (train_line(X_train_path=""), "`X_train_path` must be a non-empty string, got ''"),
    (train_line(X_train_path=["a.npz"]), "`X_train_path` must be a non-empty string, got ['a.npz']"),
    (train_line(data_path="f.npz"), "unknown key(s) in train request: ['data_path']"),
    (train_line(trial_number="3"), "`trial_number` must be an int, got '3'"),
    (train_line(fold_idx=1.0), "`fold_idx` must be an int, got 1.0"),
    (train_line(normalize_features=1), "`normalize_features` must be true or false, got 1"),
    (train_line(use_leaky_relu="true"), "`use_leaky_relu` must be true or false, got 'true'"),
    (train_line(batch_mode="huge"), "`batch_mode` must be one of ['auto', 'full', 'mini'], got 'huge'"),
    (train_line(seed=-1), "`seed` must be a non-negative int, got -1"),
    (train_line(seed=2**63), "`seed` must be a non-negative int"),
    (train_line(seed=1.0), "`seed` must be a non-negative int, got 1.0"),
    (train_line(job_id=[1]), "`job_id` must be a string or int, got [1]"),
    (train_line(save_model_path=""), "`save_model_path` must be a non-empty string, got ''"),
    (train_line(save_model_path=5), "`save_model_path` must be a non-empty string, got 5"),
]


@pytest.mark.parametrize("raw, message", BAD_REQUESTS, ids=[m[:40] for _, m in BAD_REQUESTS])
def test_a_bad_request_is_refused_naming_the_field(raw, message):
    with pytest.raises(BadRequest) as info:
        TrainRequest.from_dict(raw)
    assert message in str(info.value)
    assert info.value.error_type == "bad_request" and isinstance(info.value, JobError)


@pytest.mark.parametrize("raw, kind", [([], "list"), ("train", "str"), (None, "NoneType"), (7, "int")])
def test_a_request_that_is_not_an_object_is_refused(raw, kind):
    with pytest.raises(BadRequest, match=f"a request must be a JSON object, got {kind}"):
        TrainRequest.from_dict(raw)


def test_a_refused_request_keeps_the_identity_fields_it_could_read():
    with pytest.raises(BadRequest) as info:
        TrainRequest.from_dict(train_line(batch_mode="huge", trial_number=8, fold_idx=0, job_id=12))
    assert (info.value.trial_number, info.value.fold_idx, info.value.job_id) == (8, 0, 12)
    # Unreadable identity fields are dropped, not echoed back as garbage.
    with pytest.raises(BadRequest) as info:
        TrainRequest.from_dict(train_line(trial_number="8", fold_idx=True, job_id={"a": 1}))
    assert (info.value.trial_number, info.value.fold_idx, info.value.job_id) == (None, None, None)


# --- batch plans and fusion ------------------------------------------------------------------


@pytest.mark.parametrize("mode, rows, resolved", [
    ("auto", AUTO_FULL_BATCH_MAX_ROWS, "full"),
    ("auto", AUTO_FULL_BATCH_MAX_ROWS + 1, "mini"),
    ("full", 10**7, "full"),
    ("mini", 3, "mini"),
])
def test_batch_mode_resolution(mode, rows, resolved):
    assert resolve_batch_mode(mode, rows) == resolved


def test_an_unknown_batch_mode_cannot_be_resolved():
    with pytest.raises(ValueError, match="`batch_mode` must be one of"):
        resolve_batch_mode("huge", 10)


def test_batch_size_matters_only_to_mini_batch_plans():
    small, large = NNParams(batch_size=32), NNParams(batch_size=512)
    assert batch_plan(TrainRequest("f", small, batch_mode="full"), 100) == ("full", None)
    assert batch_plan(TrainRequest("f", small, batch_mode="auto"), 100) == batch_plan(TrainRequest("f", large), 100)
    assert batch_plan(TrainRequest("f", small, batch_mode="mini"), 100) == ("mini", 32)
    assert batch_plan(TrainRequest("f", small), None) == ("auto", 32)  # rows unknown: unresolved
    assert batch_plan(TrainRequest("f", small, batch_mode="full"), None) == ("full", None)


def test_fusion_key_is_equal_exactly_when_shapes_and_loop_agree():
    base = TrainRequest("a.npz", NNParams(hidden_layers=(16, 8), epochs=5), trial_number=0, fold_idx=0, seed=1)
    # What may differ per model inside one fused pass:
    free = TrainRequest("b.npz", NNParams(hidden_layers=(16, 8), epochs=5, learning_rate=0.5, dropout=0.1,
                                          weight_decay=0.01, early_stopping_patience=2, gradient_clip=0.0),
                        trial_number=7, fold_idx=3, seed=99, job_id="x")
    assert fusion_key(base, 100) == fusion_key(free, 100)
    assert len(fusion_key(base)) == len(FUSE_KEYS) + 1
    for changed in (
        TrainRequest("a.npz", NNParams(hidden_layers=(16, 4), epochs=5)),
        TrainRequest("a.npz", NNParams(hidden_layers=(16, 8), epochs=6)),
        TrainRequest("a.npz", NNParams(hidden_layers=(16, 8), epochs=5, optimizer="sgd")),
        TrainRequest("a.npz", NNParams(hidden_layers=(16, 8), epochs=5), normalize_features=False),
        TrainRequest("a.npz", NNParams(hidden_layers=(16, 8), epochs=5), use_leaky_relu=False),
        TrainRequest("a.npz", NNParams(hidden_layers=(16, 8), epochs=5), batch_mode="mini"),
    ):
        assert fusion_key(changed, 100) != fusion_key(base, 100), changed
