"""The process a site's SuperExec launches for each message's ClientApp (`oncofed-clientapp`, in place of Flower's
`flwr-clientapp`: client/flower_superexec.py): Flower's own, except that it runs the OncoFed this site installed, never
the code the server's app carries.

Flower's deployment engine ships the apps from the server: each ClientApp process installs the run's app (FAB) as the
SuperLink stores it, puts its directory first on sys.path and imports the site's code from it. Left so, the site's
DP-SGD, privacy ledger and refusals would be whatever the server sent, and a server sending other code (compiled
files included, which Python imports as readily) would read the site's tables. (Flower's own remedy, FABs signed by
trusted entities, needs a SuperLink with app verification, which the open-source one lacks.) Here Flower's three
steps are replaced:
- pulling the message also records the app's (hash, id, version) the message names;
- installing the app only compares it with this site's OncoFed (`foreign_code`) and writes nothing: an app that is
  not the site's own version is refused, naming the files, so that a server on other code is told so instead of
  the site running a protocol the server does not;
- loading the ClientApp imports `client.app:app` from this site's installation, sys.path untouched.
So nothing of the app the server sent is imported or written, whatever it holds. A consortium that upgrades runs
again once its sites have installed the same version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import posixpath
import sys
import tomllib
import zipfile
from pathlib import Path

from shared_models.protocol import FOREIGN_APP

CLIENTAPP_COMMAND = "oncofed-clientapp"  # the console script (pyproject [project.scripts])
CLIENTAPP_REF = "client.app:app"  # the site's ClientApp: what the app's pyproject must name
DISTRIBUTION = "oncofed"  # the installed distribution whose version the app's must be
PACKAGES = ("oncofed", "client", "server", "shared_models", "privacy", "simulations")  # OncoFed's code (fab-include)
FLOWER_MANIFEST = ".info/CONTENT"  # Flower's list of the app's files and their hashes


def launcher() -> Path:
    """The `oncofed-clientapp` this Python's OncoFed installed, beside its executable (as a virtualenv has it). Never one
    found on PATH: that is another installation's, which compares the app with, and runs, its own OncoFed."""
    return Path(sys.executable).with_name(CLIENTAPP_COMMAND)


class ForeignAppError(RuntimeError):
    """The app the server sent is not this site's OncoFed."""


def _installed(relative: str) -> Path | None:
    """Where this site's installed OncoFed keeps `relative` (e.g. client/app.py), None outside OncoFed's packages:
    found through the import system, so the same for a checkout installed in place and an installed wheel."""
    top, _, rest = relative.partition("/")
    if top not in PACKAGES or not rest:
        return None
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / rest


def _plain(name: str) -> bool:
    """A member name that extraction writes where it says: relative, no '.', '..' or empty parts, no backslash."""
    return bool(name) and "\\" not in name and not name.startswith("/") and posixpath.normpath(name) == name and not any(
        part in ("", ".", "..") for part in name.split("/"))


def _pyproject_problems(data: bytes) -> list[str]:
    project = tomllib.loads(data.decode())
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    meta = project.get("project", {})
    problems = []
    if app.get("components", {}).get("clientapp") != CLIENTAPP_REF:
        problems.append(f"pyproject.toml names ClientApp {app.get('components', {}).get('clientapp')!r}, not "
                        f"{CLIENTAPP_REF!r}")
    try:
        own = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        own = None
    if (meta.get("name"), str(meta.get("version"))) != (DISTRIBUTION, own):
        problems.append(f"pyproject.toml is of {meta.get('name')} {meta.get('version')}, this site runs "
                        f"{DISTRIBUTION} {own}")
    return problems


def foreign_code(fab: bytes, loaded_as: tuple[str, str, str] | None = None) -> list[str]:
    """What in the app (the FAB's bytes) is not this site's OncoFed, [] if nothing: every member must be one of
    OncoFed's Python files byte for byte as installed here, a bundled schema (simulations/schemas/*.json), Flower's
    manifest or the one pyproject.toml (this ClientApp, this distribution and version); anything else (compiled
    files, other packages' modules, names extraction would rewrite) is named. `loaded_as`: the (hash, app id, version)
    the message names, which must be this app's."""
    problems = []
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        names = z.namelist()
        for name in names:
            if not _plain(name):
                problems.append(f"{name!r} (a name extraction would rewrite)")
            elif name == "pyproject.toml":
                problems += _pyproject_problems(z.read(name))
            elif name == FLOWER_MANIFEST or (name.startswith("simulations/schemas/") and name.endswith(".json")
                                             and name.count("/") == 2):
                continue
            elif not name.endswith(".py") or (local := _installed(name)) is None:
                problems.append(f"{name} (not in this site's OncoFed)")
            else:
                try:
                    same = local.read_bytes() == z.read(name)
                except OSError:
                    same = False
                if not same:
                    problems.append(name if local.exists() else f"{name} (not in this site's OncoFed)")
        if names.count("pyproject.toml") != 1:
            problems.append(f"{names.count('pyproject.toml')} pyproject.toml files, not one")
        if loaded_as is not None and "pyproject.toml" in names:
            project = tomllib.loads(z.read("pyproject.toml").decode())
            own = (hashlib.sha256(fab).hexdigest(),
                   f"{project.get('tool', {}).get('flwr', {}).get('app', {}).get('publisher')}/"
                   f"{project.get('project', {}).get('name')}", str(project.get("project", {}).get("version")))
            if tuple(loaded_as) != own:
                problems.append(f"the message names app {loaded_as[1]} {loaded_as[2]} ({loaded_as[0][:12]}), not the "
                                f"app it carries ({own[1]} {own[2]}, {own[0][:12]})")
    return problems


def check_app(fab: bytes, loaded_as: tuple[str, str, str] | None = None) -> None:
    """Raise ForeignAppError, naming the files, unless the app is this site's own OncoFed (and, with `loaded_as`, is
    the app the message names)."""
    if problems := foreign_code(fab, loaded_as):
        shown = ", ".join(problems[:8]) + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ForeignAppError(
            f"{FOREIGN_APP}: {len(problems)} of its files differ from the OncoFed this site "
            f"installed ({shown}). A site runs only the code its IT installed: if the consortium upgraded, install the "
            "same OncoFed version at the site (after your review), then the next round runs; if not, tell the operator")


def checked(pull):
    """Replacements for Flower's `pull_task_input(client)`, `install_from_fab(fab_content, ...)` and
    `get_load_client_app_fn(...)` in its ClientApp process: the first records what the pulled message names, the
    second only checks the app against it and this site's OncoFed (nothing is written), the third loads the site's
    installed ClientApp."""
    pulled: dict = {}

    def pull_task_input(client):
        message, context, run, fab = pull(client)
        pulled["as"] = (fab.hash_str, run.fab_id, run.fab_version)
        return message, context, run, fab

    def install_from_fab(fab_content: bytes, *args, **kwargs) -> None:
        check_app(fab_content, pulled.get("as"))

    def get_load_client_app_fn(*args, **kwargs):
        def load(fab_id: str, fab_version: str, fab_hash: str):
            from client.app import app  # this site's installation: sys.path is not touched

            return app
        return load
    return pull_task_input, install_from_fab, get_load_client_app_fn


def main() -> None:
    """Flower's `flwr-clientapp` with its three app steps replaced (`checked`; its run_clientapp looks them up in its
    module at each call). A refusal is the ClientApp's error: the server's message for this site fails, and nothing
    of the app was written or ran."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    (run_clientapp.pull_task_input, run_clientapp.install_from_fab,
     run_clientapp.get_load_client_app_fn) = checked(run_clientapp.pull_task_input)
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


if __name__ == "__main__":
    main()
