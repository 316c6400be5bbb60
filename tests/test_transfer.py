"""Transfer learning: frozen features for every registered network, and initial weights
from a state dict, a fedpacs model file, a MONAI bundle and the registry (issue #13)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fedpacs.common.artifacts import read_model_file, save_model
from fedpacs.common.engine import make_loss
from fedpacs.common.errors import AuthError, ConfigError, DataError
from fedpacs.common.hashing import sha256_file
from fedpacs.common.models import MODELS, build_model
from fedpacs.common.nets.googlenet import training_loss
from fedpacs.common.registry_api import export_bundle
from fedpacs.common.signing import MANIFEST, generate_signing_key, sign_run
from fedpacs.common.tasks import TaskConfig
from fedpacs.common.transfer import (
    HEADS,
    freeze_features,
    head_keys,
    init_model_problems,
    load_init_model,
    weights_sha256,
)
from fedpacs.server.recorder import RoundRecord
from fedpacs.server.registry import Registry
from fedpacs.server.rundir import RunDirectory

TASK = TaskConfig(name="t", kind="classification", network="resnet18", spatial_dims=2,
                  in_channels=1, num_classes=2, input_shape=(28, 28), width=8)


def small_task(network: str) -> TaskConfig:
    spec = MODELS[network]
    shape = (16, 16, 16) if 2 not in spec.spatial_dims else (32, 32)
    return TaskConfig(name="t", kind=spec.kind, network=network, spatial_dims=len(shape),
                      in_channels=1, num_classes=3, input_shape=shape, width=8)


def task_with(**changes: object) -> TaskConfig:
    return TaskConfig.from_dict(TASK.to_dict() | changes)


# --------------------------------------------------------------------------- frozen features
def test_every_registered_network_has_a_head() -> None:
    assert set(HEADS) == set(MODELS)


@pytest.mark.parametrize("network", sorted(MODELS))
def test_freeze_features_trains_only_the_head(network: str) -> None:
    task = small_task(network)
    torch.manual_seed(0)
    model = build_model(task, seed=1)
    model.train()
    frozen = freeze_features(model, network)
    head = head_keys(model, network)
    params = dict(model.named_parameters())
    trainable = {k for k, p in params.items() if p.requires_grad}
    assert trainable and trainable == {k for k in params if k in head}
    assert frozen == len(params) - len(trainable)
    head_numel = sum(params[k].numel() for k in trainable)
    assert head_numel < sum(p.numel() for p in params.values()) / 2
    assert len(trainable) < len(params) / 2
    # frozen normalisation layers keep their running statistics
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            in_head = any(name == h or name.startswith(f"{h}.") for h in HEADS[network])
            assert module.training == in_head, name

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, task.in_channels, *task.input_shape)
    if task.kind == "segmentation":
        y = torch.randint(0, task.num_classes, (2, 1, *task.input_shape))
    else:
        y = torch.tensor([0, 2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)  # as the engine
    opt.zero_grad(set_to_none=True)
    training_loss(make_loss(task), model(x), y).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the head did not train"
    assert changed <= head, f"frozen tensors changed: {sorted(changed - head)[:5]}"
    assert trainable <= changed | {k for k in trainable if params[k].grad is None
                                   or not params[k].grad.any()}


@pytest.mark.parametrize("network", sorted(MODELS))
def test_the_head_holds_every_layer_shaped_by_the_classes(network: str) -> None:
    """The head is the first layer with one output per class and every layer after it:
    at least each tensor whose shape changes with the number of classes."""
    task = small_task(network)
    three = build_model(task).state_dict()
    five = build_model(TaskConfig.from_dict(task.to_dict() | {"num_classes": 5}))
    by_classes = {k for k, v in five.state_dict().items() if v.shape != three[k].shape}
    assert by_classes and by_classes <= head_keys(five, network)


def test_freeze_refuses_an_unknown_network_or_another_networks_model() -> None:
    model = build_model(TASK)
    with pytest.raises(ConfigError, match="resnet18"):
        freeze_features(model, "resnet19")
    with pytest.raises(ConfigError, match="classifier.6"):
        freeze_features(model, "vgg16")
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- weights hash
def test_weights_sha256_is_content_only() -> None:
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    h = weights_sha256(state)
    assert h == weights_sha256({"b": state["b"].clone(), "a": state["a"].t().contiguous().t()})
    assert h == weights_sha256(dict(reversed(state.items())))
    variants = [
        {**state, "a": state["a"].reshape(3, 2)},  # shape
        {**state, "a": state["a"].double()},  # dtype
        {**state, "a": state["a"].view(torch.int32)},  # dtype alone: the same bytes
        {"c": state["a"], "b": state["b"]},  # key
        {**state, "a": state["a"] + torch.tensor([[0, 0, 0], [0, 0, 1e-6]])},  # one value
        {"a": state["a"]},  # a tensor fewer
    ]
    assert len({h, *(weights_sha256(v) for v in variants)}) == len(variants) + 1
    weights_sha256({"bf16": torch.ones(3, dtype=torch.bfloat16), "z": torch.tensor(1.0)})


# --------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def source_model() -> nn.Module:
    return build_model(TASK, seed=7)


def test_state_dict_files_load(tmp_path: Path, source_model: nn.Module) -> None:
    want = weights_sha256(source_model.state_dict())
    assert want != weights_sha256(build_model(TASK).state_dict())
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(source_model.state_dict(), plain)
    torch.save({"state_dict": source_model.state_dict(), "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        init = load_init_model(str(path), TASK)
        assert (init.kind, init.source, init.weights_sha256) == ("file", str(path), want)
        assert init_model_problems(str(path), TASK) == []


def test_round0_checkpoint_has_the_sources_weights_hash(tmp_path: Path,
                                                        source_model: nn.Module) -> None:
    src = tmp_path / "src.pt"
    save_model(src, model=source_model, task=TASK, card={})
    init = load_init_model(str(src), TASK)
    assert init.weights_sha256 == weights_sha256(read_model_file(src)["state_dict"])
    model = build_model(TASK)
    model.load_state_dict(init.state_dict)
    save_model(tmp_path / "round-000.pt", model=model, task=TASK, card={"round": 0})
    saved = read_model_file(tmp_path / "round-000.pt")["state_dict"]
    assert weights_sha256(saved) == init.weights_sha256
    key = next(k for k, v in saved.items() if v.is_floating_point())
    saved[key].view(-1)[0] += 1
    assert weights_sha256(saved) != init.weights_sha256


def test_half_precision_weights_take_the_models_dtype(tmp_path: Path,
                                                      source_model: nn.Module) -> None:
    half = {k: v.half() if v.is_floating_point() else v
            for k, v in source_model.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    init = load_init_model(str(tmp_path / "half.pt"), TASK)
    model = build_model(TASK)
    model.load_state_dict(init.state_dict)
    assert weights_sha256(model.state_dict()) == init.weights_sha256


def test_monai_bundle_loads(tmp_path: Path, source_model: nn.Module) -> None:
    save_model(tmp_path / "model.pt", model=source_model, task=TASK, card={})
    bundle = export_bundle(tmp_path / "model.pt", tmp_path / "bundle")
    init = load_init_model(str(bundle), TASK)
    assert init.kind == "bundle"
    assert init.weights_sha256 == weights_sha256(source_model.state_dict())

    (bundle / "models" / "model.pt").rename(bundle / "models" / "model.ts")
    with pytest.raises(ConfigError, match="TorchScript"):
        load_init_model(str(bundle), TASK)
    (bundle / "models" / "model.ts").rename(bundle / "models" / "model.pt")
    (bundle / "configs").rename(tmp_path / "configs")
    with pytest.raises(ConfigError, match="no configs/"):
        load_init_model(str(bundle), TASK)


# --------------------------------------------------------------------------- registry
def publish(tmp_path: Path, model: nn.Module, *, signed: bool = True
            ) -> tuple[Path, Path, Path]:
    """A registry with one finished run, ``breast-v1``: (registry root, run dir, public key)."""
    run = RunDirectory(tmp_path / "runs" / "r1", task=TASK, config={"task": "t"})
    run.save_round(build_model(TASK), RoundRecord(0, heldout={"accuracy": 0.5}))
    run.save_final(model, {"sites": {"a": 10}, "num_rounds": 1, "strategy": "fedavg"})
    pub = generate_signing_key(tmp_path / "pki" / "artifact-signing.key")
    if signed:
        sign_run(run.root, tmp_path / "pki" / "artifact-signing.key")
    Registry(tmp_path / "registry").publish(run.root, "breast-v1", allow_unsigned=not signed)
    return tmp_path / "registry", run.root, pub


def test_registry_model_loads_checked_against_its_manifest(tmp_path: Path,
                                                           source_model: nn.Module) -> None:
    root, _, pub = publish(tmp_path, source_model)
    want = weights_sha256(source_model.state_dict())
    for key in (None, pub):
        init = load_init_model("breast-v1", TASK, registry_root=root, public_key=key)
        assert (init.kind, init.source, init.weights_sha256) == ("registry", "breast-v1", want)
    assert init_model_problems("breast-v1", TASK, registry_root=root) == []


def test_unknown_registry_id_suggests_the_nearest(tmp_path: Path,
                                                  source_model: nn.Module) -> None:
    root, _, _ = publish(tmp_path, source_model)
    with pytest.raises(ConfigError) as exc:
        load_init_model("breast-v2", TASK, registry_root=root)
    (err,) = exc.value.errors
    assert err.field == "init-model" and "breast-v1" in err.expected
    assert "'breast-v2'" in err.got and "did you mean 'breast-v1'" in err.fix


def test_a_tampered_registry_model_is_refused(tmp_path: Path, source_model: nn.Module) -> None:
    root, run_dir, pub = publish(tmp_path, source_model)
    save_model(run_dir / "final" / "model.pt", model=build_model(TASK, seed=99), task=TASK,
               card={})  # a valid model file, other weights
    for key in (None, pub):
        with pytest.raises(DataError) as exc:
            load_init_model("breast-v1", TASK, registry_root=root, public_key=key)
        assert exc.value.kind == "model-hash-mismatch" and "manifest" in exc.value.problem
    (problem,) = init_model_problems("breast-v1", TASK, registry_root=root)
    assert problem.field == "init-model" and "manifest" in problem.got

    # the manifest rewritten to match: the signature no longer does, the card still differs
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["files"]["final/model.pt"] = sha256_file(run_dir / "final" / "model.pt")
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AuthError, match="signature"):
        load_init_model("breast-v1", TASK, registry_root=root, public_key=pub)
    with pytest.raises(DataError, match="model card"):
        load_init_model("breast-v1", TASK, registry_root=root)


def test_an_unsigned_registry_model_is_checked_against_its_card(
        tmp_path: Path, source_model: nn.Module) -> None:
    root, run_dir, _ = publish(tmp_path, source_model, signed=False)
    assert load_init_model("breast-v1", TASK, registry_root=root).kind == "registry"
    save_model(run_dir / "final" / "model.pt", model=build_model(TASK), task=TASK, card={})
    with pytest.raises(DataError, match="model card"):
        load_init_model("breast-v1", TASK, registry_root=root)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("changes", "named"), [
    ({"width": 16}, ["conv1.weight [16, 1, 3, 3] instead of [8, 1, 3, 3]", "more"]),
    ({"num_classes": 3}, ["fc.weight [3, 64] instead of [2, 64]", "fc.bias [3] instead of [2]"]),
    ({"network": "resnet34"}, ["unexpected", "layer1.2.conv1.weight [8, 8, 3, 3]",
                               "a resnet34 model"]),
    ({"network": "densenet121"}, ["missing (conv1.weight [8, 1, 3, 3]", "more", "unexpected",
                                  "features.conv0.weight [16, 1, 3, 3]"]),  # (small-input stem)
])
def test_weights_of_another_shape_are_refused_naming_the_layers(
        tmp_path: Path, source_model: nn.Module, changes: dict[str, object],
        named: list[str]) -> None:
    path = tmp_path / "other.pt"
    save_model(path, model=build_model(task_with(**changes)), task=task_with(**changes),
               card={})
    with pytest.raises(ConfigError) as exc:
        load_init_model(str(path), TASK)
    (err,) = exc.value.errors
    assert err.field == "init-model"
    assert err.expected == f"weights for resnet18 ({len(source_model.state_dict())} tensors)"
    assert err.fix == "use a model of the same network, task width, channels and classes"
    for text in named:
        assert text in err.got, (text, err.got)
    assert init_model_problems(str(path), TASK) == [err]


def test_missing_files_and_ids_are_config_errors(tmp_path: Path) -> None:
    for source in (str(tmp_path / "nope.pt"), "nope", ""):
        with pytest.raises(ConfigError) as exc:
            load_init_model(source, TASK, registry_root=tmp_path)
        assert exc.value.errors[0].field == "init-model"
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"\.pt or \.pth"):
        load_init_model(str(tmp_path / "weights.npz"), TASK)
    with pytest.raises(ConfigError, match="MONAI bundle"):
        load_init_model(str(tmp_path), TASK)


class Boom:
    """A pickled object whose unpickling would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return os.open, (str(self.marker), os.O_CREAT | os.O_WRONLY)


def test_unreadable_or_foreign_files_are_data_errors(tmp_path: Path,
                                                     source_model: nn.Module) -> None:
    good = tmp_path / "good.pt"
    save_model(good, model=source_model, task=TASK, card={})
    cases = {"garbage.pt": b"not a torch file", "truncated.pt": good.read_bytes()[:2000]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    marker = tmp_path / "executed"
    torch.save({"fc.weight": Boom(marker)}, tmp_path / "pickle.pt")
    torch.save({"fc.weight": [1, 2]}, tmp_path / "lists.pt")
    torch.save({"format": "fedpacs-strategy/1", "task": {}}, tmp_path / "other.pt")
    nan = {k: v.clone() for k, v in source_model.state_dict().items()}
    nan["fc.bias"][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    kinds = {}
    for name in ("garbage.pt", "truncated.pt", "pickle.pt", "lists.pt", "other.pt", "nan.pt"):
        with pytest.raises(DataError) as exc:
            load_init_model(str(tmp_path / name), TASK)
        kinds[name] = exc.value.kind
        (problem,) = init_model_problems(str(tmp_path / name), TASK)
        assert problem.field == "init-model" and name in problem.got
    assert not marker.exists()
    assert kinds == {"garbage.pt": "unreadable-model", "truncated.pt": "unreadable-model",
                     "pickle.pt": "unreadable-model", "lists.pt": "not-a-state-dict",
                     "other.pt": "not-a-model", "nan.pt": "non-finite-model"}
