"""The process a site's SuperExec launches for each message's ClientApp (`oncofed-clientapp`, in place of Flower's
`flwr-clientapp`: shared_models.flower_tools.run_superexec): Flower's own, which first checks that the app the
server sent is this site's own OncoFed code.

Flower's deployment engine ships the apps from the server: each ClientApp process installs the run's app (FAB) as the
SuperLink stores it and imports the site's code from that copy. Left so, the site's DP-SGD, privacy ledger and
refusals would run whatever code the server sent, and a server that sent other code could read the site's tables.
(Flower's own remedy, FABs signed by trusted entities, needs a SuperLink that supports app verification, which the
open-source SuperLink does not.) Here every Python file of the app must be byte for byte the file of the OncoFed this
site installed, and the app's ClientApp the site's own; otherwise the app is not installed, nothing of it runs, and
the server gets an error naming the files that differ. So a site runs only the code its IT installed: a consortium
that upgrades runs again once its sites have installed the same version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import tomllib
import zipfile
from pathlib import Path

CLIENTAPP_COMMAND = "oncofed-clientapp"  # the console script (pyproject [project.scripts])
CLIENTAPP_REF = "client.app:app"  # the site's ClientApp: what the app's pyproject must name
FLOWER_MANIFEST = ".info/CONTENT"  # Flower's list of the app's files and their hashes (it checks them itself)


class ForeignAppError(RuntimeError):
    """The app the server sent is not this site's OncoFed."""


def _installed(relative: str) -> Path | None:
    """Where this site's installed OncoFed keeps `relative` (e.g. client/app.py), None if no installed package of that
    name: found through the import system, so the same for a checkout installed in place and an installed wheel."""
    top, _, rest = relative.partition("/")
    if not rest or not top.isidentifier():
        return None
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / rest


def foreign_code(fab: bytes, loaded_as: tuple[str, str, str] | None = None) -> list[str]:
    """What in the app (the FAB's bytes) is not this site's OncoFed: each Python file that is not byte for byte the
    installed one, and a ClientApp other than the site's. Files that are not Python (the bundled schemas) are data
    the site's code does not import. `loaded_as`: (hash, app id, version) the ClientApp process will load the app
    under (Flower's message names them): they must be this app's, or the process would import another directory
    of the account's installed apps than the one this app is installed in."""
    problems = []
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        for name in z.namelist():
            if name == "pyproject.toml":
                project = tomllib.loads(z.read(name).decode())
                app = project.get("tool", {}).get("flwr", {}).get("app", {})
                components = app.get("components", {})
                if components.get("clientapp") != CLIENTAPP_REF:
                    problems.append(f"pyproject.toml names ClientApp {components.get('clientapp')!r}, not "
                                    f"{CLIENTAPP_REF!r}")
                if loaded_as is not None:
                    meta = project.get("project", {})
                    own = (hashlib.sha256(fab).hexdigest(), f"{app.get('publisher')}/{meta.get('name')}",
                           str(meta.get("version")))
                    if tuple(loaded_as) != own:
                        problems.append(f"the message loads app {loaded_as[1]} {loaded_as[2]} ({loaded_as[0][:12]}), "
                                        f"not the app it carries ({own[1]} {own[2]}, {own[0][:12]})")
            elif name.endswith(".py"):
                local = _installed(name)
                try:
                    same = local is not None and local.read_bytes() == z.read(name)
                except OSError:
                    same = False
                if not same:
                    problems.append(name if local is not None and local.exists() else f"{name} (not in this site's "
                                    "OncoFed)")
    return problems


def check_app(fab: bytes, loaded_as: tuple[str, str, str] | None = None) -> None:
    """Raise ForeignAppError, naming the files, unless the app is this site's own OncoFed (and, with `loaded_as`, is
    what the process will load)."""
    if problems := foreign_code(fab, loaded_as):
        shown = ", ".join(problems[:8]) + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ForeignAppError(
            f"the site refuses the app the server sent: {len(problems)} of its files differ from the OncoFed this site "
            f"installed ({shown}). A site runs only the code its IT installed: if the consortium upgraded, install the "
            "same OncoFed version at the site (after your review), then the next round runs; if not, tell the operator")


def checked(pull, install):
    """Flower's `pull_task_input(client)` and `install_from_fab(fab_content, ...)`, the second called only for this
    site's own OncoFed, loaded under its own name (what the first pulled says what the process will load)."""
    pulled: dict = {}

    def pull_task_input(client):
        message, context, run, fab = pull(client)
        pulled["as"] = (fab.hash_str, run.fab_id, run.fab_version)
        return message, context, run, fab

    def checked_install(fab_content: bytes, *args, **kwargs):
        check_app(fab_content, pulled.get("as"))
        return install(fab_content, *args, **kwargs)
    return pull_task_input, checked_install


def main() -> None:
    """Flower's `flwr-clientapp` with the app checked before Flower installs it (its run_clientapp looks both functions
    up in its module at each call). A refusal is the ClientApp's error: the server's message for this site fails,
    and nothing of the app ran."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.pull_task_input, run_clientapp.install_from_fab = checked(run_clientapp.pull_task_input,
                                                                            run_clientapp.install_from_fab)
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


if __name__ == "__main__":
    main()
