"""`fedpacs baseline centralized|local`: the researcher's baselines for a federated run
(fedpacs.server.baseline): the same run.toml, the sites' configs (or one pooled data set
cut into partitions), the same held-out split, a run directory in the same format.

A baseline reads every site's data in one place: only a research simulation that holds
the pooled data can run it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from fedpacs.common.config import RunConfig
    from fedpacs.server.baseline import BaselineSite

LOG = logging.getLogger("fedpacs.baseline")

baseline_cli = typer.Typer(no_args_is_help=True, help=(
    "Researcher: centralized (pooled) and local-only baselines of a federated run, on "
    "the same held-out cases (needs access to every site's data: research simulation)."))

SitesArg = Annotated[list[Path] | None, typer.Argument(
    help="the federated run's site configs (TOML), read as each site reads its data",
    show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option(
    help="the federated run's run.toml (task, network, recipe, rounds, local epochs, "
         "\\[evaluation] held-out data)")]
OutOpt = Annotated[Path, typer.Option(help="the baseline's run directory")]
DataOpt = Annotated[Path | None, typer.Option(
    help="instead of site configs: one pooled data set (a MedMNIST .npz, a NIfTI or image "
         "folder), cut into --partitions sites as a site's \\[data] partition/num_partitions")]
PartitionsOpt = Annotated[int, typer.Option(help="with --data: the number of sites")]
FormatOpt = Annotated[str, typer.Option(help="with --data: its format (default: from the "
                                             "path)")]
RoundsOpt = Annotated[int | None, typer.Option(help="override the run's rounds")]
EpochsOpt = Annotated[int | None, typer.Option(help="override the run's local epochs")]
SeedOpt = Annotated[int | None, typer.Option(help="override the run's seed")]
EvalOpt = Annotated[str | None, typer.Option(help="override the run's held-out data")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]


def sites_from_configs(paths: Sequence[Path], cfg: RunConfig) -> list[BaselineSite]:
    """The sites of a federated run from their site configs, each read as the site reads
    it (fedpacs.client.data: any format a site trains on, its ``[data]`` preprocessing,
    then the task's preprocessing). Every config must be of the run's task."""
    from fedpacs.client.config import load_site_config
    from fedpacs.client.data import load_site_data
    from fedpacs.common.errors import ConfigError, FieldError
    from fedpacs.common.preprocess import preprocessed
    from fedpacs.server.baseline import BaselineSite

    task = cfg.task_config()
    configs = [load_site_config(p) for p in paths]
    errs = [FieldError(f"{c.source}: site.task", f"the run's task {cfg.task!r}",
                       repr(c.task), "pass the site configs of this run's sites")
            for c in configs if c.task != cfg.task]
    names = [c.name for c in configs]
    errs += [FieldError("--sites", "site configs of distinct sites", f"{n!r} twice",
                        "pass each site's config once") for n in sorted(set(names))
             if names.count(n) > 1]
    if errs:
        raise ConfigError("baseline sites", errs)
    out = []
    for c in configs:
        data = preprocessed(load_site_data(c.data, task, preprocess=c.preprocess), task)
        for path, reason in data.skipped:
            LOG.warning("site %s skipped %s: %s", c.name, path, reason)
        out.append(BaselineSite(c.name, c.data.partition, data))
    return out


def _inputs(config: Path | None, sites: list[Path] | None, data: Path | None,
            partitions: int, fmt: str, flags: dict[str, Any]) -> tuple[Any, Any]:
    """The run config (validated for a baseline) and the sites' data."""
    from fedpacs.common.config import load_run_config
    from fedpacs.common.errors import ConfigError, FieldError
    from fedpacs.server.baseline import check_baseline_config, sites_from_pool

    given = {k: v for k, v in flags.items() if v is not None}
    cfg = check_baseline_config(load_run_config(config, given))
    if bool(sites) == (data is not None):
        raise ConfigError("baseline", [FieldError(
            "SITES / --data", "either the run's site configs or one pooled --data set",
            "both" if sites else "neither",
            "pass the site configs (fedpacs baseline centralized --config run.toml --out "
            "DIR site-a.toml site-b.toml), or --data POOL --partitions N")])
    if data is not None:
        return cfg, sites_from_pool(data, cfg, partitions=partitions, fmt=fmt)
    return cfg, sites_from_configs(list(sites or []), cfg)


@baseline_cli.command("centralized")
def centralized_cmd(sites: SitesArg = None, config: ConfigOpt = None,
                    out: OutOpt = Path("runs/baseline-centralized"), data: DataOpt = None,
                    partitions: PartitionsOpt = 3, format: FormatOpt = "",  # noqa: A002
                    rounds: RoundsOpt = None, local_epochs: EpochsOpt = None,
                    seed: SeedOpt = None, eval_root: EvalOpt = None,
                    device: DeviceOpt = "auto") -> None:
    """Train on the sites' pooled training splits for rounds x local-epochs epochs."""
    from fedpacs.server.baseline import run_centralized

    cfg, loaded = _inputs(config, sites, data, partitions, format, {
        "rounds": rounds, "local_epochs": local_epochs, "seed": seed, "eval_root": eval_root})
    path = run_centralized(cfg=cfg, sites=loaded, out=out, device=device)
    typer.echo(f"centralized baseline of {len(loaded)} site(s): {path}")


@baseline_cli.command("local")
def local_cmd(sites: SitesArg = None, config: ConfigOpt = None,
              out: OutOpt = Path("runs/baseline-local"), data: DataOpt = None,
              partitions: PartitionsOpt = 3, format: FormatOpt = "",  # noqa: A002
              rounds: RoundsOpt = None, local_epochs: EpochsOpt = None,
              seed: SeedOpt = None, eval_root: EvalOpt = None,
              device: DeviceOpt = "auto") -> None:
    """Train each site alone on its own training split for the same budget."""
    from fedpacs.server.baseline import run_local

    cfg, loaded = _inputs(config, sites, data, partitions, format, {
        "rounds": rounds, "local_epochs": local_epochs, "seed": seed, "eval_root": eval_root})
    path = run_local(cfg=cfg, sites=loaded, out=out, device=device)
    typer.echo(f"local baselines of {len(loaded)} site(s): {path}")
