"""bench/accuracy.py: its grid, the issue's target checks, the table and the README
section it writes, against hand-made results (no training)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import accuracy as acc
from bench import zoo


def _result(dataset: str, split: str, method: str, seed: int, value: float,
            **kw: object) -> acc.Result:
    return acc.Result(dataset, split, seed, method, 5, 3, value=value, wall_s=10.0 + seed,
                      **kw)  # type: ignore[arg-type]


def test_grid_runs_every_method_and_names_what_cannot_run() -> None:
    arms, skipped = acc.grid(datasets=["breastmnist", "hippocampus"],
                             splits=["iid", "dir0.5", "source"], methods=acc.all_methods(),
                             seeds=range(3), rounds={"breastmnist": 5, "hippocampus": 3},
                             sites=3)
    methods = acc.all_methods()
    assert methods == ["centralized", "local", "fedavg", "fedprox", "fedbn", "finetune",
                       "secagg", "dp-eps10", "dp-eps1000"]
    # BreastMNIST (ResNet-18, batch norm): every method on IID and alpha 0.5, 3 seeds each
    breast = [a for a in arms if a.dataset == "breastmnist"]
    assert len(breast) == 2 * len(methods) * 3
    assert {a.rounds for a in breast} == {5} and {a.sites for a in arms} == {3}
    # the hippocampus U-Net: no FedBN (no learned normalisation), no label skew
    hippo = {(a.split, a.method) for a in arms if a.dataset == "hippocampus"}
    assert hippo == {("iid", m) for m in methods if m != "fedbn"}
    assert "no learned normalisation" in skipped[("hippocampus", "iid", "fedbn")]
    assert "one class per case" in skipped[("hippocampus", "dir0.5", "fedavg")]
    # no data set here carries a source
    assert all("no source" in skipped[(d, "source", m)]
               for d in ("breastmnist", "hippocampus") for m in methods)
    quick, _ = acc.quick_grid(3, acc.DP_EPSILONS)
    assert {a.dataset for a in quick} == {"breastmnist", "pneumoniamnist", "hippocampus"}
    assert len({a.seed for a in quick if a.dataset == "breastmnist"}) == 3


@pytest.mark.parametrize("method", acc.all_methods())
def test_each_method_is_a_valid_run_config(method: str) -> None:
    cfg = acc.base_config(acc.Arm("breastmnist", "iid", 1, method, 5, 3))
    assert cfg.validate() == []
    assert (cfg.seed, cfg.rounds, cfg.min_sites, cfg.cross_site) == (1, 5, 3, False)
    assert cfg.secagg == (method == "secagg")
    assert (cfg.strategy == "fedprox") == (method == "fedprox")
    assert cfg.fedbn == (method == "fedbn")
    assert (cfg.personalize == "finetune") == (method == "finetune")
    assert (cfg.dp_clip > 0) == method.startswith("dp-eps")
    if method == "dp-eps10":
        assert (cfg.dp_epsilon, cfg.dp_delta) == (10.0, acc.DP_DELTA)


def _cells() -> dict[tuple[str, str, str], acc.Cell]:
    results = []
    values = {  # breastmnist, means over 3 seeds (offsets -0.01, 0, +0.01)
        ("iid", "centralized"): 0.850, ("iid", "local"): 0.700, ("iid", "fedavg"): 0.845,
        ("iid", "secagg"): 0.844, ("iid", "dp-eps10"): 0.600, ("iid", "dp-eps1000"): 0.830,
        ("dir0.5", "centralized"): 0.850, ("dir0.5", "local"): 0.650,
        ("dir0.5", "fedavg"): 0.800, ("dir0.5", "fedprox"): 0.830,
        ("dir0.5", "secagg"): 0.790, ("dir0.5", "dp-eps10"): 0.640,
    }
    for (split, method), v in values.items():
        results += [_result("breastmnist", split, method, s, v + (s - 1) * 0.01)
                    for s in range(3)]
    results.append(_result("breastmnist", "iid", "fedavg", 3, math.nan, error="boom"))
    return acc.summarize(results)


def test_summary_is_mean_and_spread_over_seeds_without_failed_runs() -> None:
    cells = _cells()
    c = cells[("breastmnist", "iid", "fedavg")]
    assert c.n == 3 and c.failed == 1
    assert c.mean == pytest.approx(0.845)
    assert c.std == pytest.approx(math.sqrt(2 / 3) * 0.01)
    assert c.text() == "0.845 ± 0.008 (3)"
    assert acc.Cell(0.5, 0.0, 1, 1.0).text() == "0.500 (1)"
    assert acc.Cell(math.nan, 0.0, 0, 1.0, failed=2).text() == "failed"


def test_targets_are_judged_on_the_means() -> None:
    got = {(v.target, v.scope): v for v in acc.verdicts(_cells(), recommended_eps=1000)}
    iid = got[("FedAvg ≥ 99 % of centralized (IID)", "BreastMNIST")]
    assert iid.status == "PASS" and "99.4 %" in iid.detail  # 0.845 / 0.850
    skew = got[("best federated ≥ 97 % of centralized (α=0.5)", "BreastMNIST")]
    assert skew.status == "PASS" and "FedProx" in skew.detail and "97.6 %" in skew.detail
    # DP at epsilon 10 is a federated method at or below the local mean on alpha 0.5
    local = got[("every federated method > local-only mean", "BreastMNIST, Dirichlet α=0.5")]
    assert local.status == "MISS" and "local DP ε=10 0.640" in local.detail
    assert got[("every federated method > local-only mean", "BreastMNIST, IID")].status \
        == "MISS"  # 0.600 (dp-eps10) < 0.700
    assert got[("SecAgg+ within 0.005 of FedAvg", "BreastMNIST, IID")].status == "PASS"
    sec = got[("SecAgg+ within 0.005 of FedAvg", "BreastMNIST, Dirichlet α=0.5")]
    assert sec.status == "MISS" and "-0.0100" in sec.detail
    judged = got[("DP cost ≤ 4 % at ε=1000 (judged) (IID)", "BreastMNIST")]
    assert judged.status == "PASS" and "cost 1.8 %" in judged.detail  # (0.845-0.83)/0.845
    shown = got[("DP cost ≤ 4 % at ε=10 (shown) (IID)", "BreastMNIST")]
    assert shown.status == "MISS" and "cost 29.0 %" in shown.detail
    # a run whose outputs are NaN is diverged: out of the mean, whatever AUC it recorded
    nan_runs = [_result("breastmnist", "iid", m, s, v, diverged=(m == "dp-eps10"))
                for m, v in (("fedavg", 0.84), ("local", 0.7), ("dp-eps10", 1.0))
                for s in range(2)]
    cells = acc.summarize(nan_runs)
    assert cells[("breastmnist", "iid", "dp-eps10")].text() == "diverged (2)"
    v = {x.target: x for x in acc.verdicts(cells, recommended_eps=10)}
    assert v["DP cost ≤ 4 % at ε=10 (judged) (IID)"].status == "MISS"
    assert "diverged" in v["DP cost ≤ 4 % at ε=10 (judged) (IID)"].detail
    above = v["every federated method > local-only mean"]
    assert above.status == "MISS" and "local DP ε=10 diverged in 2 seed(s)" in above.detail
    # a target whose runs are missing says so, never PASS
    only_iid = {k: c for k, c in _cells().items() if k[1] == "iid"}
    v = {x.target: x for x in acc.verdicts(only_iid, recommended_eps=1000)}
    assert v["best federated ≥ 97 % of centralized (α=0.5)"].status == "n/a"


def _doc() -> dict[str, object]:
    results = [_result("breastmnist", "iid", m, s, 0.8 + 0.01 * s,
                       local_spread={"min": 0.6, "max": 0.75} if m == "local" else {},
                       personal_gain=0.05 if m == "finetune" else math.nan)
               for m in ("centralized", "local", "fedavg", "finetune") for s in range(3)]
    return {"command": "python bench/accuracy.py --quick", "machine_line": "2 CPU cores",
            "jobs": 2, "total_s": 600.0, "methods": acc.all_methods(),
            "dp_recommended": 1000.0, "dp_notes": ["BreastMNIST: d = 1 values"],
            "skipped": {"breastmnist|source|fedavg": "no source per case"},
            "results": [asdict(r) for r in results],
            "simulation": [{"dataset": "breastmnist", "split": "iid", "seed": 0, "rounds": 2,
                            "sim_curve": [0.5, 0.7, 0.8], "identical_rounds": 3,
                            "all_identical": True, "max_abs_diff": 0.0, "sim_wall_s": 30.0}],
            "left": ["AdrenalMNIST3D"], "notes": []}


def test_table_and_readme_section(tmp_path: Path) -> None:
    body = acc.readme_body(json.loads(json.dumps(_doc())))
    assert "| method | IID | by source | s / run |" in body
    assert "| FedAvg | 0.810 ± 0.008 (3) | n/a | 11 |" in body
    assert "sites 0.600–0.750" in body and "site val +0.050" in body
    assert "n/a: no source per case." in body and "Not in this run: AdrenalMNIST3D; " in body
    assert "BreastMNIST IID: not run: FedProx (μ=0.01), FedBN, FedAvg under SecAgg+" in body
    assert "identical in 3 of 3 rounds" in body and "bit-identical" in body
    assert "| FedAvg ≥ 99 % of centralized (IID) | BreastMNIST | **PASS** |" in body
    text = (f"# x\n{zoo.BEGIN}\nzoo table\n{zoo.END}\n## Benchmarks\n{acc.BEGIN}\nold\n"
            f"{acc.END}\nafter\n")
    out = zoo.rewrite_section(text, body, begin=acc.BEGIN, end=acc.END)
    assert "old" not in out and "zoo table" in out and out.endswith(f"{acc.END}\nafter\n")
    assert zoo.rewrite_section(out, body, begin=acc.BEGIN, end=acc.END) == out
    # the script end to end from a JSON, training nothing
    readme, doc = tmp_path / "README.md", tmp_path / "a.json"
    readme.write_text(text, encoding="utf-8")
    doc.write_text(json.dumps(_doc()), encoding="utf-8")
    out_json = tmp_path / "b.json"
    assert acc.main(["--from-json", str(doc), "--readme", str(readme), "--json", str(out_json),
                     "--note", "Why FedAvg misses: too few rounds."]) == 0
    written = readme.read_text(encoding="utf-8")
    assert "| FedAvg | 0.810 ± 0.008 (3)" in written
    assert "Why FedAvg misses: too few rounds." in written
    assert json.loads(out_json.read_text())["notes"] == ["Why FedAvg misses: too few rounds."]
    with pytest.raises(ValueError, match="accuracy:start"):
        zoo.rewrite_section("no markers", body, begin=acc.BEGIN, end=acc.END)


def test_bad_arguments_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        acc.parse_args(["--datasets", "mnist", "--methods", "fedyogi", "--splits", "zipf"])
    err = capsys.readouterr().err
    assert "'mnist'" in err and "'fedyogi'" in err and "'zipf'" in err
    with pytest.raises(SystemExit):
        acc.parse_args(["--dp-recommended", "5"])
    assert "--dp-recommended" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        acc.parse_args(["--note", "a reason"])
    assert "--note: only with --from-json" in capsys.readouterr().err
    assert acc.parse_args(["--quick"]).deadline_min == 26.0
    assert acc.parse_args([]).deadline_min == 0.0


def test_gaps_name_what_the_full_grid_lacks() -> None:
    results = [_result("pneumoniamnist", "iid", m, s, 0.9) for m in acc.all_methods()
               for s in range(3)]
    results += [_result("pneumoniamnist", "dir0.5", "fedavg", s, 0.9) for s in range(2)]
    results.append(_result("pneumoniamnist", "dir0.5", "local", 0, 0.9, error="boom"))
    results.append(_result("pneumoniamnist", "dir0.5", "fedprox", 0, math.nan, diverged=True))
    _, skipped = acc.grid(datasets=list(acc.DATASETS), splits=list(acc.SPLITS),
                          methods=acc.all_methods(), seeds=[0], rounds=dict.fromkeys(
                              acc.DATASETS, 1), sites=3)
    gaps = acc.grid_gaps(results, skipped)
    pneu = [g for g in gaps if g.startswith("PneumoniaMNIST")]
    assert pneu[0].startswith("PneumoniaMNIST Dirichlet α=0.5: not run: centralized (pooled), "
                              "local only")  # (a failed run does not count)
    assert "; 1 of 3 seeds for FedProx (μ=0.01); 2 of 3 seeds for FedAvg" in pneu[0]
    assert pneu[1] == "PneumoniaMNIST Dirichlet α=0.1: not run"
    assert len(pneu) == 2  # IID is complete
    # segmentation: IID only, no FedBN on the U-Net; no data set carries a source
    assert "MSD hippocampus IID: not run" in gaps
    assert not any("hippocampus Dirichlet" in g or "source" in g for g in gaps)


def test_runs_of_several_invocations_merge_into_one_table(tmp_path: Path) -> None:
    first = _doc()
    second = _doc() | {"command": "python bench/accuracy.py --first-seed 3 --seeds 1",
                       "total_s": 100.0, "jobs": 1, "left": ["stale"], "notes": ["old"]}
    second["results"] = [asdict(_result("breastmnist", "iid", "fedavg", 0, 0.5)),
                         asdict(_result("breastmnist", "iid", "fedavg", 3, 0.83))]
    second["simulation"] = [dict(first["simulation"][0], kind="deployed")]  # type: ignore
    merged = acc.merge_docs([first, second])
    fedavg = sorted((r["seed"], round(r["value"], 6)) for r in merged["results"]
                    if r["method"] == "fedavg")
    assert fedavg == [(0, 0.5), (1, 0.81), (2, 0.82), (3, 0.83)]  # the later seed 0 wins
    assert merged["command"] == ["python bench/accuracy.py --quick",
                                 "python bench/accuracy.py --first-seed 3 --seeds 1"]
    assert (merged["total_s"], merged["jobs"]) == (700.0, 2)
    assert merged["left"] == [] and merged["notes"] == []
    assert [s.get("kind", "simulation") for s in merged["simulation"]] == ["simulation",
                                                                           "deployed"]
    body = acc.readme_body(merged)
    assert body.startswith("`python bench/accuracy.py --quick` and `python bench/accuracy.py "
                           "--first-seed 3 --seeds 1`: 13 runs (0 failed), 11.7 min")
    assert "| FedAvg | 0.740 ± 0.139 (4) |" in body
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first), encoding="utf-8")
    b.write_text(json.dumps(second), encoding="utf-8")
    out = tmp_path / "m.json"
    assert acc.main(["--from-json", str(a), str(b), "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["results"]) == 13


def test_local_epochs_and_first_seed_shape_the_runs() -> None:
    arms, _ = acc.grid(datasets=["adrenalmnist3d"], splits=["iid"],
                       methods=["fedavg", "finetune"], seeds=range(1, 3),
                       rounds={"adrenalmnist3d": 2}, sites=3, local_epochs=1)
    assert sorted({a.seed for a in arms}) == [1, 2] and {a.local_epochs for a in arms} == {1}
    cfg = acc.base_config(next(a for a in arms if a.method == "finetune"))
    assert (cfg.local_epochs, cfg.personalize_epochs, cfg.rounds) == (1, 1, 2)
    default = acc.base_config(acc.Arm("adrenalmnist3d", "iid", 0, "fedavg", 2, 3))
    assert default.local_epochs == acc.training_defaults("adrenalmnist3d").local_epochs == 2
    args = acc.parse_args(["--first-seed", "1", "--seeds", "2", "--local-epochs", "1"])
    assert (args.first_seed, args.seeds, args.local_epochs) == (1, 2, 1)
    body = acc.readme_body(_doc() | {"results": [asdict(acc.Result(
        "adrenalmnist3d", "iid", 1, "fedavg", 2, 3, 1, value=0.8))]})
    assert "3 sites, 2 rounds × 1 local epochs" in body


def test_a_diverged_run_is_counted_as_diverged_not_failed() -> None:
    old = asdict(_result("pneumoniamnist", "iid", "dp-eps10", 0, math.nan, diverged=True,
                         error="held-out auc after the last round is nan"))
    assert acc.load_result(old).error == ""
    crashed = asdict(_result("pneumoniamnist", "iid", "fedavg", 0, math.nan,
                             error="RuntimeError: boom"))
    assert acc.load_result(crashed).error == "RuntimeError: boom"
    cells = acc.summarize([acc.load_result(old), acc.load_result(crashed)])
    assert cells[("pneumoniamnist", "iid", "dp-eps10")].text() == "diverged (1)"
    assert cells[("pneumoniamnist", "iid", "fedavg")].text() == "failed"


def test_site_rounds_that_added_nothing_are_counted_and_shown() -> None:
    three, two = dict.fromkeys(("a", "b", "c"), {}), dict.fromkeys(("a", "c"), {})
    rows = [{"round": 0}, {"round": 1, "train_sites": three, "secagg": {"sites_summed": 3}},
            {"round": 2, "train_sites": two, "secagg": {"sites_summed": 2, "sites_dropped": 1}},
            {"round": 3, "dropped": 1, "train_sites": {"a": {}}}]
    assert acc.site_rounds_lost(rows, 3) == 3
    cells = acc.summarize([_result("breastmnist", "dir0.5", "secagg", s, 0.8, lost=s)
                           for s in range(3)])
    assert cells[("breastmnist", "dir0.5", "secagg")].text() == \
        "0.800 ± 0.000 (3) [3 site-rounds lost]"


def test_secagg_at_another_clip_is_a_named_variant() -> None:
    cfg = acc.base_config(acc.Arm("pneumoniamnist", "dir0.1", 0, "secagg-clip32", 3, 3))
    assert cfg.secagg and cfg.secagg_clip == 32.0 and cfg.validate() == []
    assert acc.base_config(acc.Arm("pneumoniamnist", "iid", 0, "secagg", 3, 3)).secagg_clip == \
        acc.base_config(acc.Arm("pneumoniamnist", "iid", 0, "fedavg", 3, 3)).secagg_clip
    assert acc.method_label("secagg-clip32") == "FedAvg under SecAgg+, clip 32"
    assert not acc.is_variant("secagg-clipx") and not acc.is_variant("secagg")
    methods = acc.with_variants(acc.all_methods(), ["fedavg", "secagg-clip32"])
    assert methods[methods.index("secagg") + 1] == "secagg-clip32"
    args = acc.parse_args(["--methods", "secagg,secagg-clip32"])
    assert args.method_list == ["secagg", "secagg-clip32"]
    with pytest.raises(SystemExit):
        acc.parse_args(["--methods", "secagg-clipbig"])
    # shown in the table after SecAgg+; not a gap of the grid when absent
    doc = _doc()
    doc["methods"] = methods
    doc["results"] = [*doc["results"], asdict(_result("breastmnist", "iid", "secagg-clip32",
                                                      0, 0.81))]  # type: ignore[list-item]
    body = acc.readme_body(doc)
    assert "| FedAvg under SecAgg+, clip 32 | 0.810 (1) |" in body
    gaps = acc.grid_gaps([_result("breastmnist", "iid", "fedavg", 0, 0.8)], {}, methods)
    assert any("BreastMNIST IID: not run: centralized" in g for g in gaps)
    assert not any("clip 32" in g for g in gaps)
