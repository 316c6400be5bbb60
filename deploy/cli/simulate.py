"""`fedpacs simulate`: a run on N virtual sites (Flower's Simulation Engine, Ray), with
the run config `fedpacs run start` takes and a pooled data set partitioned over the sites.
Parses, validates and calls fedpacs.deploy.simulate.simulate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedpacs.common.partition import DEFAULT_ALPHA, PARTITIONERS


def simulate_cmd(
    data: Annotated[Path, typer.Option(
        help="the pooled data set: a MedMNIST .npz, a NIfTI folder (images/, labels/) or an "
             "image folder")],
    config: Annotated[Path | None, typer.Option(
        help="run.toml as `fedpacs run start` takes it; flags override it")] = None,
    run_dir: Annotated[Path, typer.Option(help="the run directory (new)")] = Path(
        "runs/simulation"),
    sites: Annotated[int, typer.Option(help="number of virtual sites")] = 3,
    partition: Annotated[str, typer.Option(
        help=f"{' | '.join(PARTITIONERS)}: near-equal random shards, label skew "
             "(Dirichlet --alpha per class), quantity skew (Dirichlet --alpha site sizes), "
             "one site per source (--sources)")] = "iid",
    alpha: Annotated[float, typer.Option(
        help="Dirichlet concentration for dirichlet/quantity (0.1: strong skew, 100: "
             "near IID)")] = DEFAULT_ALPHA,
    split_seed: Annotated[int, typer.Option(help="seed of the partition")] = 0,
    sources: Annotated[Path | None, typer.Option(
        help="CSV case_id,source for --partition source")] = None,
    split: Annotated[Path | None, typer.Option(
        help="reuse a saved split.json (repeat a run exactly) instead of partitioning")
                     ] = None,
    require_all_classes: Annotated[bool, typer.Option(
        help="refuse a split leaving a site without some class (default: a warning)")
                                   ] = False,
    data_format: Annotated[str | None, typer.Option(
        "--format", help="medmnist | nifti | images | image-masks (default: from --data)")
                           ] = None,
    holdout_fraction: Annotated[float, typer.Option(
        help="held-out share of a NIfTI/image data set, never on a site (MedMNIST: its "
             "test split)")] = 0.2,
    data_seed: Annotated[int, typer.Option(help="seed of the held-out split")] = 0,
    ray_address: Annotated[str, typer.Option(
        help="an existing Ray cluster's head HOST:PORT (or ray://HOST:PORT, auto); "
             "default: Ray on this machine. The run directory and data must be at the "
             "same paths on its nodes")] = "",
    connect_timeout: Annotated[float, typer.Option(
        help="seconds to reach --ray-address")] = 10.0,
    cpus_per_site: Annotated[float, typer.Option(
        help="Ray CPUs per running virtual site (how many train at once)")] = 1.0,
    task: Annotated[str | None, typer.Option(help="task preset")] = None,
    network: Annotated[str | None, typer.Option(help="network (default: the task's)")] = None,
    strategy: Annotated[str | None, typer.Option(help="strategy (default fedavg)")] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds")] = None,
    min_sites: Annotated[int | None, typer.Option(
        help="sites needed per round (default: every virtual site)")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="default: the task's")] = None,
    batch_size: Annotated[int | None, typer.Option(help="default: the task's")] = None,
    lr: Annotated[float | None, typer.Option(help="default: the task's")] = None,
    seed: Annotated[int | None, typer.Option(help="the run's seed")] = None,
    secagg: Annotated[bool | None, typer.Option(
        "--secagg/--no-secagg", help="SecAgg+ (default: the run config's, on)")] = None,
    cross_site: Annotated[bool | None, typer.Option(
        "--cross-site/--no-cross-site", help="NxN validation at the end")] = None,
    dp_clip: Annotated[float | None, typer.Option(help="local DP clip (0: off)")] = None,
    dp_epsilon: Annotated[float | None, typer.Option(help="local DP epsilon")] = None,
) -> None:
    """Run the ServerApp and ClientApp on Flower's Simulation Engine with N virtual sites
    of a partitioned pooled data set; writes a deployed run's run directory plus
    split.json, sites/ and simulation.json."""
    from fedpacs.common.config import DataSpec, infer_eval_format, load_run_config
    from fedpacs.common.errors import ConfigError, FieldError
    from fedpacs.deploy.simulate import SimulationOptions, check_ray_address, simulate

    check_ray_address(ray_address, timeout_s=connect_timeout)  # first: fails in seconds
    errs = []
    if partition not in PARTITIONERS:
        errs.append(FieldError("--partition", f"one of {', '.join(PARTITIONERS)}",
                               repr(partition), "e.g. --partition dirichlet --alpha 0.5"))
    if sites < (0 if partition == "source" else 1):
        errs.append(FieldError("--sites", ">= 1", str(sites), "e.g. --sites 10"))
    if not data.exists():
        errs.append(FieldError("--data", "an existing data set", str(data),
                               "point --data at a .npz or a data folder"))
    if errs:
        raise ConfigError("simulate", errs)
    fmt = data_format or infer_eval_format(str(data))
    flags = {k: v for k, v in {
        "task": task, "network": network, "strategy": strategy, "rounds": rounds,
        "min_sites": min_sites, "local_epochs": local_epochs, "batch_size": batch_size,
        "lr": lr, "seed": seed, "secagg": secagg, "cross_site": cross_site,
        "dp_clip": dp_clip, "dp_epsilon": dp_epsilon}.items() if v is not None}
    cfg = load_run_config(config, flags)
    if min_sites is None and (config is None or "min_sites" not in _run_keys(config)):
        from dataclasses import replace

        cfg = replace(cfg, min_sites=sites if sites > 0 else cfg.min_sites)
    spec = DataSpec(format=fmt, root=data.resolve(),  # type: ignore[arg-type,unused-ignore]
                    holdout_fraction=holdout_fraction, seed=data_seed)
    res = simulate(cfg=cfg, options=SimulationOptions(
        data=spec, sites=sites, partition=partition, alpha=alpha, split_seed=split_seed,
        sources=sources, split_file=split, require_all_classes=require_all_classes,
        ray_address=ray_address, cpus_per_site=cpus_per_site,
        connect_timeout_s=connect_timeout), run_dir=run_dir, echo=typer.echo)
    typer.echo(f"simulated run of {res.sites} virtual sites finished in {res.wall_s:.1f} s; "
               f"run directory {res.run_dir}; final model {res.final_model}; memory "
               f"{res.memory.per_site_mib:.0f} MiB per running virtual site "
               f"({res.memory.actors} Ray worker(s))")


def _run_keys(config: Path) -> set[str]:
    """The [run] keys a run.toml sets."""
    from fedpacs.common.config import read_toml

    run = read_toml(config).get("run", {})
    return set(run) if isinstance(run, dict) else set()
