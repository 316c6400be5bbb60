"""The ``fedpacs`` command line (Typer), split by role: ``site`` (hospital, site.py),
``provision|federation|run|registry|metrics`` (coordinator, coordinator.py) and ``models``
(researcher, researcher.py), ``baseline`` (researcher, baseline.py); ``demo`` plays
all three on one host. Each command parses, validates and calls one library function;
errors print what is wrong and exit with a code from the registry."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from fedpacs.common.errors import EXIT_CODES, ExitCode, FedpacsError
from fedpacs.deploy.cli.baseline import baseline_cli
from fedpacs.deploy.cli.coordinator import (
    federation_cli,
    metrics_cli,
    provision_cli,
    registry_cli,
    run_cli,
)
from fedpacs.deploy.cli.researcher import models_cli
from fedpacs.deploy.cli.simulate import simulate_cmd
from fedpacs.deploy.cli.site import site_cli

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="fedpacs: federated training across hospitals' PACS.")
cli.add_typer(site_cli, name="site")
cli.add_typer(provision_cli, name="provision")
cli.add_typer(federation_cli, name="federation")
cli.add_typer(run_cli, name="run")
cli.add_typer(registry_cli, name="registry")
cli.add_typer(metrics_cli, name="metrics")
cli.add_typer(models_cli, name="models")
cli.command("simulate")(simulate_cmd)
cli.add_typer(baseline_cli, name="baseline")


@cli.command()
def demo(
    task: Annotated[str, typer.Option(help="hippocampus | breastmnist | pneumoniamnist | "
                                           "adrenalmnist3d")] = "hippocampus",
    sites: Annotated[int, typer.Option(help="number of SuperNodes (hospitals)")] = 3,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 5,
    local_epochs: Annotated[int, typer.Option(help="local epochs per round (0: task default)")] = 0,
    workdir: Annotated[Path, typer.Option(help="where PKI, logs, state and the run go")] = Path(
        "runs/demo"),
    data_dir: Annotated[Path | None, typer.Option(
        help="shared data folder (default: $FEDPACS_DATA_DIR, then ../shared/data)")] = None,
    timeout: Annotated[float, typer.Option(help="deadline for the whole run, seconds")] = 1800.0,
    classification: Annotated[bool, typer.Option(
        "--classification", help="run the MedMNIST (BreastMNIST) classification task")] = False,
    secagg: Annotated[bool, typer.Option(
        help="secure aggregation (SecAgg+): the server sees only the sum of the updates")
                      ] = True,
    dp_clip: Annotated[float, typer.Option(
        help="local differential privacy: clip each update to this L2 norm and add noise "
             "(0: off)")] = 0.0,
) -> None:
    """Run a whole federation on loopback (TLS, authenticated SuperNodes, signed app,
    SecAgg+) with real data."""
    from fedpacs.deploy.demo import DemoOptions, run_demo

    run_demo(DemoOptions(task="breastmnist" if classification else task, sites=sites,
                         rounds=rounds, local_epochs=local_epochs, workdir=workdir,
                         data_dir=data_dir, timeout_s=timeout, secagg=secagg, dp_clip=dp_clip),
             echo=typer.echo)


@cli.command("exit-codes")
def exit_codes() -> None:
    """List every exit code with its meaning."""
    for code, text in EXIT_CODES.items():
        typer.echo(f"{int(code):4d}  {code.name:<12} {text}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning fedpacs errors into messages and exit codes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        rv = cli(args=argv, standalone_mode=False)
        if isinstance(rv, int):  # typer.Exit(code) inside a command, in non-standalone mode
            return rv
    except FedpacsError as err:
        typer.echo(f"error: {err}", err=True)
        return int(err.code)
    except typer.Exit as ex:
        return int(ex.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; child processes stopped", err=True)
        return int(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        return int(ExitCode.USAGE)
    except click.exceptions.Abort:
        return int(ExitCode.INTERRUPTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry: exits with main()'s code."""
    sys.exit(main())
