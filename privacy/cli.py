"""Commands of privacy/: audit-log verification. (Provisioning commands belong to their role:
`oncofed consortium ...` / `server start` / `run` in server/cli.py, `oncofed site ...` in client/cli.py.)"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    audit = typer.Typer(help="Hash-chained audit logs of the server and the sites.", no_args_is_help=True)
    audit.command("verify")(verify)
    app.add_typer(audit, name="audit")


def verify(
    log: Path = typer.Argument(..., help="an audit.jsonl (its .head file beside it)"),
    anchors: list[Path] = typer.Option([], "--anchors", help="what the other party holds of this log's head "
                                       "(repeatable): for a server run log runs/NAME/audit.jsonl, a site's "
                                       "state/audit-anchors.json; for a site's log, the server's runs/NAME/audit.jsonl"),
    site: str = typer.Option("", "--site", help="with a server run log as --anchors: the site whose log LOG is "
                             "(the name the consortium registered it under; "
                             "default: site-name of the site.json next to LOG's state directory)"),
    trust: Path = typer.Option(None, "--trust", help="the consortium's signing.pub, to check the server's signature "
                               "on anchors (default: signing/signing.pub of the consortium directory LOG is in)"),
) -> None:
    """Report every edited, inserted, removed or reordered entry; exit 1 if there is any.

    With --anchors, also a log rewritten wholesale (chain and head recomputed) or emptied: the other party's
    copy of its head must still be in it."""
    from privacy.audit import AuditError, anchors_for
    from privacy.audit import verify as verify_log

    held, problems = [], []
    try:
        for source in anchors:
            found, trouble = anchors_for(log, source, site or _site_name(log), trust or _consortium_trust(log))
            held += found
            problems += trouble
    except (AuditError, OSError, ValueError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    report = verify_log(log, held)
    report.problems += problems
    typer.echo(report.format())
    raise typer.Exit(code=0 if report.ok else 1)


def _site_name(log: Path) -> str | None:
    """site-name of the site.json beside LOG's state directory (or LOG); a site.json there that is wrong says so."""
    from privacy.site_config import SiteConfig

    for d in (log.resolve().parent.parent, log.resolve().parent):
        if (d / "site.json").is_file() and (name := SiteConfig.load(d / "site.json").site_name):
            return name
    return None


def _consortium_trust(log: Path) -> Path | None:
    """CONSORTIUM/runs/NAME/audit.jsonl -> CONSORTIUM/signing/signing.pub, if it is there."""
    candidate = log.resolve().parent.parent.parent / "signing" / "signing.pub"
    return candidate if candidate.is_file() else None
