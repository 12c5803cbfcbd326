"""The `oncofed` command. Each role contributes its own sub-commands; heavy imports stay inside them."""

from __future__ import annotations

import typer

from oncofed import __version__

app = typer.Typer(
    name="oncofed",
    help="OncoFed: federated multi-modal cancer classification across hospitals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"oncofed {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    """OncoFed: federated multi-modal cancer classification across hospitals."""


def _register_all() -> None:
    # The entry point is the only module that sees every role; roles never import each other's CLI.
    from client.cli import register as register_client
    from privacy.cli import register as register_privacy
    from server.cli import register as register_server
    from shared_models.cli import register as register_shared
    from simulations.cli import register as register_simulations

    register_shared(app)
    register_client(app)
    register_simulations(app)
    register_privacy(app)
    register_server(app)


_register_all()
