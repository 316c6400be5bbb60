"""`fedpacs models ...`: the researcher's commands (list, show, pull and verify models).
They use only fedpacs.common (the registry client, bundle export, signature checks)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedpacs.common.errors import ConfigError, ExitCode, FieldError

if TYPE_CHECKING:
    from fedpacs.common.registry_api import RegistryClient

models_cli = typer.Typer(no_args_is_help=True,
                         help="Researcher: list, show, pull and verify models.")


def _client(url: str | None, token: str | None) -> RegistryClient:
    import os

    from fedpacs.common.registry_api import (
        REGISTRY_TOKEN_ENV,
        REGISTRY_URL_ENV,
        RegistryClient,
    )

    url = url or os.environ.get(REGISTRY_URL_ENV, "")
    token = token or os.environ.get(REGISTRY_TOKEN_ENV, "")
    errs = []
    if not url:
        errs.append(FieldError("url", "the registry URL", "nothing",
                               f"pass --url or set ${REGISTRY_URL_ENV}"))
    if not token:
        errs.append(FieldError("token", "your registry token", "nothing",
                               f"pass --token or set ${REGISTRY_TOKEN_ENV}"))
    if errs:
        raise ConfigError("models", errs)
    return RegistryClient(url, token)


UrlOpt = Annotated[str | None, typer.Option(help="registry URL ($FEDPACS_REGISTRY_URL)")]
TokenOpt = Annotated[str | None, typer.Option(help="bearer token ($FEDPACS_TOKEN)")]


@models_cli.command("verify")
def models_verify(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (or a pulled copy of one)")],
    public_key: Annotated[Path, typer.Option(help="the coordinator's signing.pub")],
) -> None:
    """Check a run's signed manifest: the signature and every artifact's SHA-256."""
    from fedpacs.common.signing import verify_run

    result = verify_run(run_dir, public_key)
    for problem in result.problems:
        typer.echo(f"FAIL {problem}", err=True)
    if not result.ok:
        raise typer.Exit(int(ExitCode.AUTH))
    typer.echo(f"OK: signature valid, {result.checked} artifacts match the signed manifest")


@models_cli.command("list")
def models_list(url: UrlOpt = None, token: TokenOpt = None) -> None:
    """List the registry's models with task, network, rounds and held-out metrics."""
    client = _client(url, token)
    for m in client.list():
        held = m.get("heldout") or {}
        key = "dice-mean" if "dice-mean" in held else "accuracy"
        value = held.get(key)
        typer.echo(f"{m['id']:30s} {m.get('task')!s:15s} {m.get('network')!s:12s} "
                   f"rounds {m.get('rounds')}  {key} "
                   f"{'-' if value is None else format(value, '.3f')}")


@models_cli.command("show")
def models_show(model_id: Annotated[str, typer.Argument()], url: UrlOpt = None,
                token: TokenOpt = None) -> None:
    """Print a model's card (JSON)."""
    import json

    client = _client(url, token)
    typer.echo(json.dumps(client.show(model_id), indent=2))


@models_cli.command("pull")
def models_pull(
    model_id: Annotated[str, typer.Argument()],
    out: Annotated[Path, typer.Option(help="download folder")] = Path("models"),
    bundle: Annotated[bool, typer.Option(help="also export a MONAI bundle")] = False,
    url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Download a model (hash-checked against its card); optionally as a MONAI bundle."""
    from fedpacs.common.registry_api import export_bundle

    client = _client(url, token)
    path = client.pull(model_id, out / model_id)
    typer.echo(f"{path}  (load: fedpacs.load_model('{path}'))")
    if bundle:
        typer.echo(f"MONAI bundle {export_bundle(path, out / model_id / 'bundle')}")

