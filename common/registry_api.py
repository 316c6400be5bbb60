"""The researcher's side of the registry API: list, show and pull models by token, and
export a pulled model as a MONAI bundle."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpacs.common.artifacts import write_json
from fedpacs.common.errors import AuthError, DataError, FedpacsError

REGISTRY_URL_ENV = "FEDPACS_REGISTRY_URL"
REGISTRY_TOKEN_ENV = "FEDPACS_TOKEN"


class RegistryError(FedpacsError):
    """The registry answered with an error (404: no such model or file)."""


@dataclass(frozen=True)
class RegistryClient:
    url: str
    token: str
    timeout_s: float = 60.0

    def _get(self, path: str) -> tuple[bytes, dict[str, str]]:
        req = urllib.request.Request(f"{self.url.rstrip('/')}/{path.lstrip('/')}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read(), dict(resp.headers.items())
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise AuthError(f"registry {self.url}: token refused (401). Fix: check "
                                f"--token / ${REGISTRY_TOKEN_ENV}") from exc
            raise RegistryError(f"registry {self.url}: GET {path} answered {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryError(f"registry {self.url} unreachable ({exc}). Fix: check --url / "
                                f"${REGISTRY_URL_ENV}") from exc

    def list(self) -> list[dict[str, Any]]:
        return list(json.loads(self._get("v1/models")[0])["models"])

    def show(self, model_id: str) -> dict[str, Any]:
        return dict(json.loads(self._get(f"v1/models/{model_id}")[0]))

    def pull(self, model_id: str, out_dir: Path) -> Path:
        """Download model.pt and its card; the model's SHA-256 must match the card's."""
        card = self.show(model_id)
        data, _ = self._get(f"v1/models/{model_id}/files/model.pt")
        expected = card.get("files", {}).get("model.pt", {}).get("sha256")
        got = hashlib.sha256(data).hexdigest()
        if expected != got:
            raise DataError(f"{model_id}/model.pt", f"SHA-256 {got} does not match the model "
                            f"card's {expected}", "pull again; report it if it persists")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.pt").write_bytes(data)
        write_json(out_dir / "model_card.json", card)
        return out_dir / "model.pt"


def export_bundle(model_path: Path, out_dir: Path) -> Path:
    """Write a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt)
    whose ``network_def`` rebuilds the same network."""
    import torch

    from fedpacs.common.artifacts import load_model
    from fedpacs.common.models import MODELS
    from fedpacs.common.tasks import TaskConfig

    model, card = load_model(model_path, device="cpu")
    task = TaskConfig.from_dict(card["task"])
    spec = MODELS[task.network]
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "models" / "model.pt")
    import monai

    heldout = (card.get("rounds") or [{}])[-1].get("heldout")
    write_json(out_dir / "configs" / "metadata.json", {
        "version": "1.0.0", "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "name": f"fedpacs {task.name} ({task.network})",
        "task": f"{task.kind} of {task.name}", "description": "Global model of a fedpacs "
        "federated run; the model card is in docs/model_card.json.",
        "authors": "fedpacs", "copyright": "see the data sets' licences",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": task.in_channels,
                                 "spatial_shape": list(task.input_shape), "dtype": "float32"}},
            "outputs": {"pred": {"type": "image" if task.kind == "segmentation" else "probs",
                                 "num_channels": task.num_classes,
                                 "channel_def": dict(enumerate(task.class_names))}}},
        "fedpacs": {"heldout": heldout, "sites": card.get("sites")},
    })
    write_json(out_dir / "configs" / "inference.json", {
        "network_def": spec.network_def(task), "network": "$@network_def.to('cpu')"})
    (out_dir / "docs").mkdir(exist_ok=True)
    write_json(out_dir / "docs" / "model_card.json", card)
    return out_dir
