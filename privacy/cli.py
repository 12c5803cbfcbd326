"""Commands of privacy/: audit-log verification. (Provisioning commands belong to their role:
`oncofed consortium ...` / `server start` / `run` in server/cli.py, `oncofed site ...` in client/cli.py.)"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    audit = typer.Typer(help="Hash-chained audit logs of the server and the sites.", no_args_is_help=True)
    audit.command("verify")(verify)
    app.add_typer(audit, name="audit")


def verify(log: Path = typer.Argument(..., help="an audit.jsonl (its .head file beside it)")) -> None:
    """Report every edited, inserted, removed or reordered entry; exit 1 if there is any."""
    from privacy.audit import verify as verify_log

    report = verify_log(log)
    typer.echo(report.format())
    raise typer.Exit(code=0 if report.ok else 1)


