"""The ClientApp on real records: a bad site config gives an error reply with a code only."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedpacs.client.app import handle
from fedpacs.client.trainer import evaluate_round, train_round
from fedpacs.common import wire
from fedpacs.common.config import RunConfig
from fedpacs.common.contract import RoundInstructions
from fedpacs.common.errors import ExitCode
from fedpacs.common.models import build_model
from fedpacs.common.tasks import TASK_PRESETS

pytestmark = pytest.mark.usefixtures("task_identity")


def _message(task: str) -> Message:
    model = build_model(TASK_PRESETS[task])
    run = RunConfig(task=task, local_epochs=1, batch_size=64)
    cfg = RoundInstructions.for_round(run, 1).to_record()
    content = RecordDict({"arrays": wire.model_to_arrays(model), "config": cfg})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(site_config: str) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": site_config},
                   state=RecordDict(), run_config={})


def _site(tmp_path: Path, data_dir: Path, task: str = "breastmnist") -> Path:
    p = tmp_path / "site.toml"
    p.write_text(f'[site]\nname = "site-x"\ntask = "{task}"\n[data]\nformat = "medmnist"\n'
                 f'root = "{data_dir}/medmnist_breast/breastmnist.npz"\npartition = 0\n'
                 f"num_partitions = 4\n[compute]\nthreads = 1\n")
    return p


def test_train_and_evaluate_reply(tmp_path: Path, data_dir: Path) -> None:
    site = _site(tmp_path, data_dir)
    reply = handle(_message("breastmnist"), _context(str(site)), train_round)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 137  # 546 train images / 4 partitions, partition 0
    assert reply.content["site"]["name"] == "site-x"
    model = build_model(TASK_PRESETS["breastmnist"])
    wire.load_arrays(model, reply.content["arrays"])  # a well-formed update
    ev = handle(_message("breastmnist"), _context(str(site)), evaluate_round)
    assert ev.content["metrics"]["num-examples"] == 20  # 78 val / 4 -> 20,20,19,19
    assert 0.0 <= ev.content["metrics"]["val-accuracy"] <= 1.0


def test_wrong_task_and_missing_config_reply_with_codes_only(tmp_path: Path,
                                                             data_dir: Path) -> None:
    site = _site(tmp_path, data_dir)
    reply = handle(_message("hippocampus"), _context(str(site)), train_round)
    assert reply.has_error() and reply.error.code == ExitCode.CONFIG
    assert str(tmp_path) not in reply.error.reason  # no site paths leave the site
    missing = handle(_message("breastmnist"), _context(str(tmp_path / "nope.toml")), train_round)
    assert missing.has_error() and missing.error.code == ExitCode.CONFIG
    assert "nope.toml" not in missing.error.reason


def test_fedbn_keeps_the_site_norm_layers(tmp_path: Path, data_dir: Path) -> None:
    import torch

    from fedpacs.client.config import load_site_config
    from fedpacs.client.trainer import FEDBN_STATE_KEY, open_round
    from fedpacs.common.models import norm_state_keys

    site = load_site_config(_site(tmp_path, data_dir))
    msg = _message("breastmnist")
    msg.content.config_records["config"]["fedbn"] = True
    state = RecordDict()
    reply = train_round(site, msg.content, state)
    local = state.array_records[FEDBN_STATE_KEY].to_torch_state_dict()
    model = build_model(TASK_PRESETS["breastmnist"])
    assert set(local) == norm_state_keys(model) and any("bn" in k for k in local)
    # next round: the global norm layers are replaced by this site's own
    nxt = _message("breastmnist")
    nxt.content.config_records["config"]["fedbn"] = True
    r = open_round(site, nxt.content, state, training=False)
    assert r.fedbn_restored == len(local)
    global_state = build_model(TASK_PRESETS["breastmnist"]).state_dict()
    trained = {n: torch.from_numpy(v) for n, v in
               wire.arrays_to_numpy(reply["arrays"], global_state).items()}
    for k in local:
        assert torch.equal(r.model.state_dict()[k], local[k].to(r.model.state_dict()[k].dtype))
    k = next(k for k in local if k.endswith("running_mean"))
    assert not torch.equal(r.model.state_dict()[k], global_state[k])
    assert torch.equal(trained[k], local[k])
    # without FedBN nothing is kept
    plain = RecordDict()
    train_round(site, _message("breastmnist").content, plain)
    assert FEDBN_STATE_KEY not in plain.array_records


def test_custom_task_travels_and_must_match_the_site(tmp_path: Path, data_dir: Path) -> None:
    import json

    import pytest as _pytest

    from fedpacs.common.errors import ConfigError
    from fedpacs.common.tasks import TaskConfig

    custom = TaskConfig(name="breast-tiny", kind="classification", network="resnet18",
                        spatial_dims=2, in_channels=1, num_classes=2, input_shape=(28, 28),
                        width=4)
    cfg = RunConfig(task="breast-tiny", task_json=json.dumps(custom.to_dict()), local_epochs=1,
                    batch_size=64)
    assert cfg.validate() == [] and cfg.task_config() == custom
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in custom.to_dict().items())
    site = tmp_path / "site.toml"
    site.write_text(f'[site]\nname = "site-x"\ntask = "breast-tiny"\n[data]\nformat = '
                    f'"medmnist"\nroot = "{data_dir}/medmnist_breast/breastmnist.npz"\n'
                    f"num_partitions = 4\n[task]\n{table}\n")
    model = build_model(custom)
    content = RecordDict({"arrays": wire.model_to_arrays(model), "config": ConfigRecord(
        RoundInstructions.for_round(cfg, 1).to_dict())})
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    reply = handle(msg, _context(str(site)), train_round)
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 137
    wire.load_arrays(build_model(custom), reply.content["arrays"])
    # a site whose [task] differs is refused, by code only
    site.write_text(site.read_text().replace("width = 4", "width = 8"))
    other = handle(msg, _context(str(site)), train_round)
    assert other.has_error() and other.error.code == ExitCode.CONFIG
    with _pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"task": "x", "task-json": '{"name": "y"}'})
    assert any(e.field.startswith("task-json.") for e in exc.value.errors)


def test_site_requiring_secagg_refuses_a_plain_round(tmp_path: Path, data_dir: Path) -> None:
    from fedpacs.client.app import app

    site = _site(tmp_path, data_dir)  # no [security] table: require_secagg defaults to true
    reply = app(_message("breastmnist"), _context(str(site)))
    assert reply.has_error() and reply.error.code == ExitCode.POLICY
    site.write_text(site.read_text() + "[security]\nrequire_secagg = false\n")
    assert not app(_message("breastmnist"), _context(str(site))).has_error()


def test_local_dp_clips_the_update(tmp_path: Path, data_dir: Path) -> None:
    import numpy as np

    from fedpacs.client.app import app

    site = _site(tmp_path, data_dir)
    site.write_text(site.read_text() + "[security]\nrequire_secagg = false\n")
    msg = _message("breastmnist")
    reference = build_model(TASK_PRESETS["breastmnist"]).state_dict()
    before = wire.arrays_to_numpy(msg.content.array_records["arrays"], reference)
    plain = app(_message("breastmnist"), _context(str(site)))
    moved = wire.update_norm(wire.arrays_to_numpy(plain.content.array_records["arrays"],
                                                  reference),
                             {k: torch.from_numpy(np.asarray(v)) for k, v in before.items()})
    assert moved > 1.0  # local training moves the weights by more than the clip below
    # epsilon huge: noise ~1e-6, so the update's L2 norm is the clip
    cfg = msg.content.config_records["config"]
    cfg["dp-clip"], cfg["dp-epsilon"], cfg["dp-delta"] = 0.5, 1e6, 1e-5
    reply = app(msg, _context(str(site)))
    assert not reply.has_error()
    after = wire.arrays_to_numpy(reply.content.array_records["arrays"], reference)
    diff = np.sqrt(sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2))
                       for k in before))
    assert diff == pytest.approx(0.5, rel=1e-3)
    assert all(np.issubdtype(a.dtype, np.floating) for a in after.values())


def test_the_train_reply_carries_the_incoming_models_evaluation(tmp_path: Path,
                                                                data_dir: Path) -> None:
    """``evaluate-first``: the reply holds the evaluation of the model it was sent (the same
    numbers as an evaluate message), under val-*, beside the same training as without."""
    import numpy as np

    from fedpacs.client import timing
    from fedpacs.client.app import app
    from fedpacs.common.contract import TIMING_KEYS

    site = _site(tmp_path, data_dir)
    site.write_text(site.read_text() + "[security]\nrequire_secagg = false\n")

    def message(evaluate_first: bool) -> Message:
        msg = _message("breastmnist")
        msg.content.config_records["config"]["evaluate-first"] = evaluate_first
        return msg

    timing.reset(**{timing.LAUNCH: time.time()})
    folded = app(message(True), _context(str(site)))
    assert not folded.has_error()
    metrics = dict(folded.content["metrics"])
    plain = app(message(False), _context(str(site)))
    evaluated = app(Message(content=_message("breastmnist").content, dst_node_id=1,
                            message_type=MessageType.EVALUATE), _context(str(site)))
    ev = dict(evaluated.content["metrics"])
    assert metrics["val-num-examples"] == ev["num-examples"] == 20
    assert metrics["val-fedbn-restored"] == ev["fedbn-restored"] == 0
    for k, v in ev.items():
        if k.startswith("val-"):
            assert metrics[k] == pytest.approx(v, abs=1e-6), k
    # every timing key in every reply (Flower refuses replies whose keys differ)
    for reply in (folded, plain, evaluated):
        assert set(TIMING_KEYS) <= set(reply.content["metrics"])
    assert metrics["t-evaluate"] > 0 and metrics["t-train"] > 0
    assert metrics["t-site"] >= metrics["t-evaluate"] + metrics["t-train"]
    assert dict(plain.content["metrics"])["t-evaluate"] == 0.0
    assert not any(k.startswith("val-") for k in plain.content["metrics"])
    # the evaluation does not change what training does
    reference = build_model(TASK_PRESETS["breastmnist"]).state_dict()
    a = wire.arrays_to_numpy(folded.content.array_records["arrays"], reference)
    b = wire.arrays_to_numpy(plain.content.array_records["arrays"], reference)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert metrics["train-loss"] == dict(plain.content["metrics"])["train-loss"]


def test_round_instructions_need_evaluate_first() -> None:
    from fedpacs.common.errors import ConfigError

    run = RunConfig(task="breastmnist")
    record = RoundInstructions.for_round(run, 1, evaluate_first=True).to_record()
    assert RoundInstructions.from_record(record).evaluate_first is True
    del record["evaluate-first"]
    with pytest.raises(ConfigError) as exc:
        RoundInstructions.from_record(record)
    assert [e.field for e in exc.value.errors] == ["config.evaluate-first"]
    record["evaluate-first"] = 1
    with pytest.raises(ConfigError) as exc:
        RoundInstructions.from_record(record)
    assert [e.field for e in exc.value.errors] == ["config.evaluate-first"]


@pytest.mark.parametrize("recipe", [
    '{"optimizer": "lbfgs"}',  # not a recipe this site's code knows
    '{"uncertainty-samples": 100000}',  # 100000 forward passes per case
    '{"loss": "dice"}',  # a segmentation loss on a classification site
    '{"augment": "flip", "shell": "rm -rf /"}',  # an unknown key
    '[1, 2]',  # not an object
])
def test_a_bad_recipe_from_the_server_is_refused(tmp_path: Path, data_dir: Path,
                                                 recipe: str) -> None:
    """A (malicious or mismatched) server's recipe is checked at the site like any of
    its input: the round is refused with the config code, nothing is trained."""
    site = _site(tmp_path, data_dir)
    msg = _message("breastmnist")
    msg.content.config_records["config"]["recipe"] = recipe
    reply = handle(msg, _context(str(site)), train_round)
    assert reply.has_error() and reply.error.code == ExitCode.CONFIG
    assert str(tmp_path) not in reply.error.reason


def test_the_recipe_and_the_rounds_learning_rate_reach_the_site(tmp_path: Path,
                                                               data_dir: Path) -> None:
    """The run's recipe travels in the round's instructions; the site trains with the
    round's scheduled rate (here SGD with warm-up: round 1 of 4 at half the base rate)."""
    from fedpacs.client.config import load_site_config
    from fedpacs.client.trainer import open_round

    run = RunConfig(task="breastmnist", local_epochs=1, batch_size=64, lr=0.01, rounds=4,
                    optimizer="sgd", momentum=0.5, warmup_rounds=1, lr_schedule="cosine",
                    augment="flip,intensity", loss="focal", class_weights="balanced")
    ins = RoundInstructions.for_round(run, 1)
    assert ins.lr == pytest.approx(0.005)
    assert RoundInstructions.for_round(run, 2).lr == pytest.approx(0.01)
    assert RoundInstructions.for_round(run, 4).lr == pytest.approx(0.01 * 0.5 * (
        1 + __import__("math").cos(__import__("math").pi * 2 / 3)))
    model = build_model(TASK_PRESETS["breastmnist"])
    msg = RecordDict({"arrays": wire.model_to_arrays(model), "config": ins.to_record()})
    r = open_round(load_site_config(_site(tmp_path, data_dir)), msg, RecordDict(),
                   training=True)
    assert r.recipe == run.recipe() and r.recipe.optimizer == "sgd"
    assert r.ins.lr == pytest.approx(0.005)
