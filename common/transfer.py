"""Transfer learning: a run's initial weights from elsewhere, and frozen feature layers.

**Initial weights** (``--init-model``): :func:`load_init_model` reads weights from a model
published in the coordinator's registry (``<root>/<model id>/final/model.pt``, checked
against the run's manifest), from a MONAI bundle folder (``configs/`` and
``models/model.pt``) or from a ``.pt``/``.pth`` file (a fedpacs model file, a plain state
dict or ``{"state_dict": ...}``). Files are read with ``torch.load(weights_only=True)``:
nothing but tensors and plain values is ever unpickled. The weights must fit the run's
network exactly (same keys, same shapes); :func:`weights_sha256` names them independently
of the file they came in, so a run's round-0 checkpoint can be traced to its source.

**Frozen features** (``freeze = "features"``): :func:`freeze_features` leaves only the
network's head trainable. The head of every registered network is the layer that first
outputs one channel (or logit) per class and every layer after it (:data:`HEADS`), i.e.
the layers whose shapes depend on the task's classes:

- resnet18/34 ``fc``; densenet121 ``class_layers`` (its only weights are ``out``);
- alexnet and vgg16 the last linear layer ``classifier.6`` (the 4096-4096 layers before
  it are features, as in "ConvNet as a fixed feature extractor"; at width 64 they hold
  most of the weights);
- googlenet ``fc`` and the last linear layer of each auxiliary classifier
  (``aux1.fc2``, ``aux2.fc2``), so the auxiliary losses keep training their own outputs;
- unet and resunet (MONAI UNet) ``model.2``, the top level's up-convolution to the classes
  (for resunet followed by its residual unit on the class channels);
- vnet ``out_tr`` (5x5x5 convolution to the classes, its batch norm, the 1x1 convolution);
- segresnet ``conv_final.2`` (the final 1x1 convolution);
- fcn8s the three score layers and the three class-channel up-convolutions;
- segnet ``classifier``; pspnet ``head.4`` (the final 1x1 convolution).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedpacs.common.artifacts import MODEL_FORMAT
from fedpacs.common.errors import AuthError, ConfigError, DataError, FieldError, did_you_mean
from fedpacs.common.hashing import sha256_file
from fedpacs.common.models import build_model, unknown_network
from fedpacs.common.registry_api import MODEL_ID_RE
from fedpacs.common.signing import MANIFEST, SIGNATURE, verify_manifest
from fedpacs.common.tasks import TaskConfig

FIELD = "init-model"
HEADS: dict[str, tuple[str, ...]] = {
    "resnet18": ("fc",),
    "resnet34": ("fc",),
    "densenet121": ("class_layers",),
    "alexnet": ("classifier.6",),
    "vgg16": ("classifier.6",),
    "googlenet": ("fc", "aux1.fc2", "aux2.fc2"),
    "unet": ("model.2",),
    "resunet": ("model.2",),
    "vnet": ("out_tr",),
    "segresnet": ("conv_final.2",),
    "fcn8s": ("score_fr", "score_pool4", "score_pool3", "up2", "up_pool4", "up8"),
    "segnet": ("classifier",),
    "pspnet": ("head.4",),
}
MODEL_SUFFIXES = (".pt", ".pth")
REGISTRY_MODEL = "final/model.pt"  # a registry entry's model (the run directory's layout)
BUNDLE_MODEL = "models/model.pt"  # a MONAI bundle's weights (common.registry_api.export_bundle)
SHOWN = 5  # layer names listed per kind of mismatch
WEIGHTS_HASH_FORMAT = b"fedpacs-weights/1\n"

InitKind = Literal["registry", "bundle", "file"]


# --------------------------------------------------------------------------- frozen features
def _head(model: nn.Module, network: str) -> tuple[str, ...]:
    """The network's head modules, checked against ``model``."""
    if network not in HEADS:
        raise ConfigError("task", [unknown_network("task.network", network)])
    heads = HEADS[network]
    modules = dict(model.named_modules())
    missing = [h for h in heads if h not in modules]
    if missing:
        raise ConfigError("task", [FieldError(
            "task.network", f"a {network} model (head {', '.join(heads)})",
            f"a {type(model).__name__} without {', '.join(missing)}",
            "pass the network the model was built for")])
    return heads


def _in_head(name: str, heads: tuple[str, ...]) -> bool:
    return any(name == h or name.startswith(f"{h}.") for h in heads)


def head_keys(model: nn.Module, network: str) -> set[str]:
    """State-dict keys (weights and buffers) of the network's head."""
    heads = _head(model, network)
    return {k for k in model.state_dict() if _in_head(k, heads)}


def freeze_features(model: nn.Module, network: str) -> int:
    """Freeze every parameter outside the network's head (requires_grad False, frozen
    normalisation layers in eval mode, so their running statistics stay fixed); returns
    the number of frozen tensors. Call it after each ``model.train()``, which would put
    the frozen normalisation layers back in training mode."""
    heads = _head(model, network)
    frozen = 0
    for name, param in model.named_parameters():
        trainable = _in_head(name, heads)
        param.requires_grad_(trainable)
        frozen += not trainable
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and not _in_head(name, heads):
            module.eval()  # BatchNorm/InstanceNorm: use, never update, running statistics
    return frozen


# --------------------------------------------------------------------------- weights hash
def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's content: sorted keys, each with its dtype, shape and raw
    bytes (on the CPU, contiguous). The same weights give the same hash whatever file
    they were read from."""
    h = hashlib.sha256(WEIGHTS_HASH_FORMAT)
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- initial weights
@dataclass(frozen=True, eq=False)
class InitModel:
    """Initial weights for a run: a state dict that fits ``build_model(task)`` exactly
    (the model's dtypes, on the CPU), its :func:`weights_sha256`, and where it came from."""

    state_dict: dict[str, torch.Tensor]
    weights_sha256: str
    source: str
    kind: InitKind


def registry_ids(registry_root: Path | None) -> list[str]:
    """Model ids of a registry folder that have a final model (server.registry's layout)."""
    if registry_root is None or not registry_root.is_dir():
        return []
    return sorted(p.name for p in registry_root.iterdir()
                  if MODEL_ID_RE.match(p.name) and (p / REGISTRY_MODEL).is_file())


def _not_found(source: str, ids: list[str], registry_root: Path | None) -> ConfigError:
    shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
    expected = "a .pt/.pth file, a MONAI bundle folder"
    if registry_root is not None:
        expected += f" or a model id of the registry {registry_root} ({shown or 'empty'})"
    else:
        expected += " or a registry model id"
    hint = did_you_mean(source, ids)
    fix = (f"pick a published model id{hint}" if hint else
           "check the path, or use an id published with `fedpacs registry publish`")
    return ConfigError(FIELD, [FieldError(FIELD, expected, f"{source!r} (no such file, "
                                          "folder or model id)", fix)])


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(str(path), f"not a readable weights file ({type(exc).__name__})",
                        "pass a state dict saved with torch.save, a fedpacs model file or a "
                        "MONAI bundle; TorchScript and pickled modules are not read",
                        kind="unreadable-model") from exc


def _state_of(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a loaded file, and what the file says it holds ('' if nothing)."""
    about = ""
    if isinstance(payload, dict) and "format" in payload:
        task = payload.get("task")
        if payload["format"] != MODEL_FORMAT or not isinstance(task, dict):
            raise DataError(str(path), f"format is {payload['format']!r}, not {MODEL_FORMAT}",
                            "pass a final/model.pt or rounds/NNN/model.pt of a fedpacs run",
                            kind="not-a-model")
        about = f"a {task.get('network')} model of task {task.get('name')!r}, "
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise DataError(str(path), "expected a state dict (layer name -> tensor) or "
                        "{'state_dict': ...}, got " + type(payload).__name__ + (
                            " with other values" if isinstance(payload, dict) else ""),
                        "save the weights with torch.save(model.state_dict(), path)",
                        kind="not-a-state-dict")
    return dict(payload), about


def _listed(items: list[str]) -> str:
    more = f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _fit(state: dict[str, torch.Tensor], task: TaskConfig, *, source: str, path: Path,
         about: str) -> dict[str, torch.Tensor]:
    """``state`` in the dtypes of ``build_model(task)``, or ConfigError naming the layers
    that are missing, unexpected or of another shape."""
    ref = build_model(task).state_dict()
    missing = [f"{k} {_shape(ref[k])}" for k in ref if k not in state]
    unexpected = [f"{k} {_shape(state[k])}" for k in state if k not in ref]
    wrong = [f"{k} {_shape(state[k])} instead of {_shape(ref[k])}" for k in ref
             if k in state and (state[k].shape != ref[k].shape
                                or state[k].is_floating_point() != ref[k].is_floating_point())]
    if missing or unexpected or wrong:
        parts = [f"{len(items)} {what} ({_listed(items)})" for what, items in (
            ("missing", missing), ("unexpected", unexpected), ("of another shape or type", wrong))
            if items]
        raise ConfigError(FIELD, [FieldError(
            FIELD, f"weights for {task.network} ({len(ref)} tensors)",
            f"{source!r}: {about}{len(state)} tensors; " + "; ".join(parts),
            "use a model of the same network, task width, channels and classes")])
    out = {k: state[k].detach().to(device="cpu", dtype=ref[k].dtype).contiguous() for k in ref}
    bad = [k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(str(path), f"weights hold NaN or Inf values ({_listed(bad)})",
                        "use a model from a run that did not diverge", kind="non-finite-model")
    return out


def _check_registry_file(run_dir: Path, model: Path, *, public_key: Path | None) -> None:
    """A registry model must have the SHA-256 its run's manifest (signature checked with
    ``public_key`` when given) and its model card name."""
    got = sha256_file(model)
    manifest = run_dir / MANIFEST
    if manifest.is_file():
        raw = manifest.read_bytes()
        if public_key is not None:
            try:
                signature = (run_dir / SIGNATURE).read_bytes()
            except OSError as exc:
                raise AuthError(f"{run_dir / SIGNATURE}: expected the run's signature, got "
                                f"none ({type(exc).__name__}). Fix: sign the run again with "
                                "the artifact-signing key, or do not use it") from exc
            files = verify_manifest(raw, signature, public_key)
        else:
            try:
                files = json.loads(raw)["files"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(str(manifest), f"not a fedpacs manifest ({type(exc).__name__})",
                                "sign the run again, or do not use this model",
                                kind="bad-manifest") from exc
        expected = files.get(REGISTRY_MODEL) if isinstance(files, dict) else None
        if expected != got:
            raise DataError(str(model), f"SHA-256 {got} differs from the run's manifest "
                            f"({expected or 'no entry for ' + REGISTRY_MODEL})",
                            "do not use this model: it changed after the run was signed "
                            "(restore it from a backup, or publish the run again)",
                            kind="model-hash-mismatch")
    card = run_dir / "final" / "model_card.json"
    if card.is_file():
        try:
            expected = json.loads(card.read_text(encoding="utf-8")).get("files", {}) \
                .get("model.pt", {}).get("sha256")
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(str(card), f"not a readable model card ({type(exc).__name__})",
                            "restore the run's final/model_card.json", kind="bad-card") from exc
        if expected is not None and expected != got:
            raise DataError(str(model), f"SHA-256 {got} differs from the model card's "
                            f"{expected}", "do not use this model: it changed after the run "
                            "finished", kind="model-hash-mismatch")


def _read(source: str, *, registry_root: Path | None, public_key: Path | None
          ) -> tuple[InitKind, Path, Any]:
    """Resolve ``source`` (a registry id first, else a path) and load its weights file."""
    if not source.strip():
        raise ConfigError(FIELD, [FieldError(
            FIELD, "a registry model id, a MONAI bundle folder or a .pt/.pth file", "''",
            "leave --init-model out to start from the network's seeded initial weights")])
    ids = registry_ids(registry_root)
    if registry_root is not None and source in ids:
        run_dir = registry_root / source
        model = run_dir / REGISTRY_MODEL
        _check_registry_file(run_dir.resolve(), model.resolve(), public_key=public_key)
        return "registry", model, _torch_load(model)
    path = Path(source).expanduser()
    if path.is_dir():
        weights = path / BUNDLE_MODEL
        if not (path / "configs").is_dir() or not weights.is_file():
            if (path / "models" / "model.ts").is_file() and not weights.is_file():
                lacks = "only models/model.ts (TorchScript)"
            else:
                lacks = f"no {'configs/' if weights.is_file() else BUNDLE_MODEL}"
            raise ConfigError(FIELD, [FieldError(
                FIELD, f"a MONAI bundle folder (configs/ and {BUNDLE_MODEL})",
                f"{str(path)!r} ({lacks})",
                "pass a bundle with its weights as a state dict in models/model.pt (as "
                "`fedpacs models pull --bundle` writes), or the .pt file itself")])
        return "bundle", weights, _torch_load(weights)
    if path.is_file():
        if path.suffix not in MODEL_SUFFIXES:
            raise ConfigError(FIELD, [FieldError(
                FIELD, "a .pt or .pth weights file", f"{str(path)!r}",
                "pass a state dict saved with torch.save, a fedpacs model.pt or a MONAI "
                "bundle folder")])
        return "file", path, _torch_load(path)
    raise _not_found(source, ids, registry_root)


def load_init_model(source: str, task: TaskConfig, *, registry_root: Path | None = None,
                    public_key: Path | None = None) -> InitModel:
    """Initial weights for ``task`` from ``source``: a model id of the registry at
    ``registry_root`` (checked against the run's manifest, and its signature when
    ``public_key``, the artifact-signing.pub, is given; ``./name`` forces a path), a MONAI
    bundle folder, or a ``.pt``/``.pth`` file. The weights must fit ``build_model(task)``
    exactly. ConfigError names what does not fit; DataError an unreadable or changed file."""
    kind, path, payload = _read(source, registry_root=registry_root, public_key=public_key)
    state, about = _state_of(payload, path)
    fitted = _fit(state, task, source=source, path=path, about=about)
    return InitModel(state_dict=fitted, weights_sha256=weights_sha256(fitted), source=source,
                     kind=kind)


def init_model_problems(source: str, task: TaskConfig, *, registry_root: Path | None = None,
                        public_key: Path | None = None) -> list[FieldError]:
    """Every problem :func:`load_init_model` would raise for ``source``, as field errors
    (empty when the weights load and fit), for validation before a run starts."""
    try:
        load_init_model(source, task, registry_root=registry_root, public_key=public_key)
    except ConfigError as exc:
        return list(exc.errors)
    except DataError as exc:
        return [FieldError(FIELD, "a readable, unchanged weights file",
                           f"{exc.path}: {exc.problem}", exc.fix)]
    except AuthError as exc:
        return [FieldError(FIELD, "a registry model whose signed manifest verifies", str(exc),
                           "do not use this model; check the run's signature")]
    return []
