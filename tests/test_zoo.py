"""bench/zoo.py: its plan covers every registered network, and its pure parts."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench import zoo
from fedpacs.common.config import RunConfig
from fedpacs.common.models import MODELS, build_model
from fedpacs.common.tasks import TASK_PRESETS


def test_the_zoo_trains_every_registered_network() -> None:
    assert zoo.zoo_networks() == set(MODELS)
    assert set(zoo.PUBLISHED_WIDTH) == set(MODELS)


def test_segmenters_run_in_every_dimensionality_they_support() -> None:
    runs = {(e.network, zoo.zoo_task(e).spatial_dims) for e in zoo.ENTRIES}
    for name, spec in MODELS.items():
        if spec.kind == "segmentation":
            assert {(name, d) for d in spec.spatial_dims} <= runs, name


@pytest.mark.parametrize("entry", zoo.ENTRIES, ids=lambda e: f"{e.network}-{e.data}")
def test_every_row_is_a_valid_task_whose_network_builds(entry: zoo.Entry) -> None:
    task = zoo.zoo_task(entry)  # validated as a run's [task] table is
    data = zoo.DATASETS[entry.data]
    preset = TASK_PRESETS[data.preset]
    assert (task.kind, task.num_classes, task.in_channels) == (
        preset.kind, preset.num_classes, preset.in_channels)
    assert entry.num_partitions >= zoo.SITES
    cfg = RunConfig(task=task.name, task_json=json.dumps(task.to_dict()), secagg=False,
                    **dict(entry.recipe))
    assert cfg.validate() == []
    params, state = zoo.count_values(task)
    assert 0 < params <= state
    with torch.device("meta"):  # shapes through the whole network, no memory
        out = MODELS[task.network].build(task).eval()(torch.zeros(2, 1, *task.input_shape))
    want = (2, task.num_classes, *task.input_shape) if task.kind == "segmentation" \
        else (2, task.num_classes)
    assert tuple(out.shape) == want


@pytest.mark.parametrize("entry", [e for e in zoo.ENTRIES if zoo.zoo_task(e).spatial_dims == 2],
                         ids=lambda e: f"{e.network}-{e.data}")
def test_2d_rows_forward_real_tensors(entry: zoo.Entry) -> None:
    task = zoo.zoo_task(entry)  # (a meta forward misses a pooling to 0x0)
    with torch.no_grad():
        out = build_model(task).eval()(torch.zeros(1, 1, *task.input_shape))
    assert out.shape[1] == task.num_classes


def test_published_width_counts_match_the_registry() -> None:
    entry = next(e for e in zoo.ENTRIES if e.network == "resnet18" and e.data == "breastmnist")
    task = zoo.zoo_task(entry)
    wide = zoo.zoo_task(zoo.Entry("resnet18", "breastmnist", 64))
    assert zoo.count_values(wide)[0] == sum(p.numel() for p in build_model(wide).parameters())
    assert zoo.published_width(entry, task) == 64


def _row(network: str, error: str = "") -> zoo.Row:
    return zoo.Row(network, "breastmnist", 2, "classification", 8, [28, 28], 2, 32,
                   params=1000, mb_per_update=0.004, round_s=[2.0, 1.0], mean_round_s=1.0,
                   sites_per_round=[3, 3], curve=[{"auc": 0.5, "accuracy": 0.3},
                                                  {"auc": 0.7, "accuracy": 0.8}],
                   train_loss=[0.7, 0.5], error=error)


def test_a_network_without_a_successful_row_is_missing() -> None:
    rows = [_row(n) for n in MODELS if n != "vnet"] + [_row("vnet", "RuntimeError: boom")]
    assert zoo.missing_networks(rows) == ["vnet"]
    assert zoo.missing_networks(rows[:-1] + [_row("vnet")]) == []


def test_a_run_counts_only_with_every_site_in_every_round() -> None:
    row = _row("resnet18")
    assert zoo.check_row(row, 2) == ""
    assert "expected 3" in zoo.check_row(row, 3)
    row.sites_per_round = [3, 2]
    assert "expected 3" in zoo.check_row(row, 2)
    row.sites_per_round = [3, 3]
    row.curve[-1]["auc"] = math.nan
    assert "held-out" in zoo.check_row(row, 2)


def test_readme_section_is_rewritten_between_the_markers_only() -> None:
    text = f"intro\n{zoo.BEGIN}\nold table\n{zoo.END}\noutro\n"
    meta = {"command": "python bench/zoo.py", "rounds": 2, "threads": 1, "total_s": 90.0,
            "machine_line": "2 CPU cores"}
    body = zoo.readme_body([_row("resnet18"), _row("vgg16", "ValueError: x")], meta)
    out = zoo.rewrite_section(text, body)
    assert out.startswith(f"intro\n{zoo.BEGIN}\n") and out.endswith(f"{zoo.END}\noutro\n")
    assert "old table" not in out and "`resnet18`" in out and "**FAILED**" in out
    assert zoo.rewrite_section(out, body) == out  # idempotent
    assert "one prediction for every" not in body
    flat = _row("googlenet")
    flat.curve[-1]["auc"] = 0.5
    assert "running variances" in zoo.readme_body([flat], meta)
    with pytest.raises(ValueError, match="zoo:begin"):
        zoo.rewrite_section("no markers here", body)


def test_recipe_mode_names_the_missing_run_config_fields(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    monkeypatch.setattr(zoo, "RECIPE_FIELDS", ("augment", "no_such_field"))
    assert "no_such_field" in zoo.missing_recipe_fields()
    assert zoo.recipe_comparison(zoo.parse_args(["--hippocampus-recipe"]), None,  # type: ignore[arg-type]
                                 None) == 2  # type: ignore[arg-type]
    assert "no_such_field" in capsys.readouterr().err


def test_cli_refuses_an_unknown_network_and_a_partial_readme() -> None:
    with pytest.raises(SystemExit):
        zoo.parse_args(["--only", "unet9000"])
    with pytest.raises(SystemExit):
        zoo.parse_args(["--only", "unet", "--readme", "README.md"])
    args = zoo.parse_args(["--only", "unet", "--data", "hippocampus"])
    assert [(e.network, e.data) for e in args.entries] == [("unet", "hippocampus")]


def test_from_json_rewrites_the_readme_and_fails_on_a_missing_network(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{zoo.BEGIN}\n{zoo.END}\n", encoding="utf-8")
    doc = {"command": "python bench/zoo.py", "machine_line": "2 CPU cores", "rounds": 2,
           "threads": 1, "total_s": 60.0, "rows": [asdict(_row(n)) for n in MODELS]}
    figures = tmp_path / "zoo.json"
    figures.write_text(json.dumps(doc), encoding="utf-8")
    assert zoo.main(["--from-json", str(figures), "--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8").count("| `") == len(MODELS)
    doc["rows"] = doc["rows"][1:]
    figures.write_text(json.dumps(doc), encoding="utf-8")
    assert zoo.main(["--from-json", str(figures)]) == 1
