"""A site runs only the OncoFed its IT installed: Flower's deployment engine ships the ClientApp's code from the
server (each ClientApp process installs the run's app and imports the site's code from it), so a site's SuperExec
launches `oncofed-clientapp`, which never installs or imports the app: it compares it with the site's own version,
refusing another, and loads the site's installed ClientApp (client/clientapp_process.py)."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def _own_fab() -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(ROOT)


def _changed(fab: bytes, edit) -> bytes:
    """The app with edit(name, bytes) -> bytes | None applied to each file (None drops it), and files edit.extra added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = edit(name, src.read(name))
            if data is not None:
                dst.writestr(name, data)
        for name, data in getattr(edit, "extra", {}).items():
            dst.writestr(name, data)
    return out.getvalue()


def test_the_app_built_from_this_sites_own_code_passes():
    from client.clientapp_process import check_app, foreign_code

    assert foreign_code(_own_fab()) == []
    check_app(_own_fab())


def test_an_app_whose_training_code_differs_is_refused_naming_the_file():
    """A server that sends DP-SGD without noise (one line of client/local_round.py changed) is refused before any of
    its code runs."""
    from client.clientapp_process import ForeignAppError, check_app

    def no_noise(name, data):
        return data.replace(b"def run_noise(", b"def run_noise_(") if name == "client/local_round.py" else data

    with pytest.raises(ForeignAppError, match=r"1 of its files differ .*client/local_round\.py.*install the same "
                                              r"OncoFed version"):
        check_app(_changed(_own_fab(), no_noise))


@pytest.mark.parametrize("extra", [{"client/upload_tables.py": b"import os\n"}, {"sitecustomize.py": b"print(1)\n"},
                                   {"json.py": b"loads = None\n"}])
def test_an_app_with_code_the_site_does_not_have_is_refused(extra):
    from client.clientapp_process import foreign_code

    def keep(name, data):
        return data
    keep.extra = extra
    (name,) = extra
    assert foreign_code(_changed(_own_fab(), keep)) == [f"{name} (not in this site's OncoFed)"]


def test_an_app_naming_another_clientapp_is_refused():
    from client.clientapp_process import foreign_code

    def other_app(name, data):
        return data.replace(b'clientapp = "client.app:app"', b'clientapp = "server.app:app"') \
            if name == "pyproject.toml" else data

    assert foreign_code(_changed(_own_fab(), other_app)) == [
        "pyproject.toml names ClientApp 'server.app:app', not 'client.app:app'"]


def _clientapp_steps(fab: bytes, loaded_as):
    """The ClientApp process's three app steps as `oncofed-clientapp` replaces them, on a message carrying `fab`."""
    import types

    from client.clientapp_process import checked

    def pull(client):
        return "message", "context", types.SimpleNamespace(fab_id=loaded_as[1], fab_version=loaded_as[2]), \
            types.SimpleNamespace(hash_str=loaded_as[0], content=fab)
    pull_task_input, install_from_fab, get_load_client_app_fn = checked(pull)
    _, _, run, pulled = pull_task_input(None)
    install_from_fab(pulled.content, skip_prompt=True)
    return get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(run.fab_id, run.fab_version,
                                                                                     pulled.hash_str)


def test_the_site_loads_its_installed_clientapp_and_writes_nothing_of_the_app(tmp_path, monkeypatch):
    """Nothing of the app the server sent is written or imported, whatever it holds (a compiled module is imported
    as readily as a source one, and an app directory already installed would be reused unchecked): the site's own
    `client.app:app`, sys.path as it was, no file under FLWR_HOME; an app naming another directory than its own is
    refused."""
    import hashlib

    import client.app
    from client.clientapp_process import ForeignAppError

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    own = _own_fab()
    ours = (hashlib.sha256(own).hexdigest(), "oncofed/oncofed", "0.1.0")
    path = list(sys.path)
    assert _clientapp_steps(own, ours) is client.app.app
    assert sys.path == path and not (tmp_path / "flwr").exists()
    with pytest.raises(ForeignAppError, match="privacy/ledger.py"):
        _clientapp_steps(_changed(own, lambda n, d: d + b"\n" if n == "privacy/ledger.py" else d), ours)
    with pytest.raises(ForeignAppError, match="the message names app oncofed/oncofed 0.1.0 \\(0000"):
        _clientapp_steps(own, ("0" * 64, *ours[1:]))
    # Flower's ClientApp process looks the three up in its module at each call: the names the launcher replaces
    from flwr.supernode.runtime import run_clientapp

    source = Path(run_clientapp.__file__).read_text()
    assert "= pull_task_input(client)" in source and "install_from_fab(fab.content" in source
    assert "load_client_app_fn = get_load_client_app_fn(" in source


@pytest.mark.parametrize("member, why", [
    ("privacy/__pycache__/__init__.cpython-311.pyc", "not in this site's OncoFed"),  # imported before the source
    ("torch.pyc", "not in this site's OncoFed"),
    ("./pyproject.toml", "a name extraction would rewrite"),  # written as pyproject.toml
    ("torch/../typing_extensions.py", "a name extraction would rewrite"),
    ("privacy//etc/x.py", "a name extraction would rewrite"),
    ("numpy/__init__.py", "not in this site's OncoFed"),  # another package's module, even byte for byte its own
    ("simulations/schemas/sub/x.json", "not in this site's OncoFed"),
])
def test_any_member_that_is_not_oncofeds_own_file_is_named(member, why):
    """The 2026-12-06 review's bypasses of a check that looked at `.py` names only: compiled files, names that
    extraction rewrites (a second pyproject.toml among them), other packages' modules."""
    from client.clientapp_process import foreign_code

    def keep(name, data):
        return data
    keep.extra = {member: b"x = 1\n"}
    problems = foreign_code(_changed(_own_fab(), keep))
    assert any(member in p and why in p for p in problems), problems


def test_an_app_of_another_version_is_refused():
    from client.clientapp_process import foreign_code

    def other_version(name, data):
        return data.replace(b'version = "0.1.0"', b'version = "0.2.0"', 1) if name == "pyproject.toml" else data

    assert foreign_code(_changed(_own_fab(), other_version)) == [
        "pyproject.toml is of oncofed 0.2.0, this site runs oncofed 0.1.0"]


def test_the_sites_superexec_launches_oncofed_clientapp_installed_beside_its_python():
    code = ("from client.flower_superexec import launch_own_clientapp; launch_own_clientapp(); "
            "from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType; "
            "print(TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).name == "oncofed-clientapp" and Path(out).is_file(), out


def test_site_start_refuses_to_start_without_the_checked_launcher(monkeypatch, tmp_path):
    """No fallback to Flower's unchecked `flwr-clientapp`, nor to another installation's `oncofed-clientapp` on PATH
    (it would compare the app with, and run, that installation's OncoFed): a site whose environment lacks its own (a
    stale install) fails its preflight, naming the fix, and its SuperExec would not launch the other one."""
    import os

    import client.supernode as sn
    from client.flower_superexec import launch_own_clientapp
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    assert sn.clientapp_check().ok
    other = tmp_path / "other-install" / "bin" / "oncofed-clientapp"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{other.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "stale-venv" / "bin" / "python"))
    check = sn.clientapp_check()
    assert not check.ok and "reinstall OncoFed" in check.detail
    monkeypatch.setitem(TASK_TYPE_TO_COMMAND, TaskType.CLIENT_APP, TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP])
    launch_own_clientapp()
    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == str(tmp_path / "stale-venv" / "bin" / "oncofed-clientapp")


# --- a site that installed OncoFed from a wheel, not a checkout ------------------------------------------------------
# What the site runs is found through the import system (client.clientapp_process._installed): the same tests against an
# installed wheel, in a Python that sees the wheel's OncoFed and not this checkout, with the app Flower builds from the
# operator's checkout. The four take about 5 s (2 cores): the wheel is built from a copy of the checkout (pip builds in
# place, and a stale build/ there would end up in it) and installed without dependencies, which the venv takes from the
# Python running the tests (a plain directory line in a .pth: that directory's own .pth files, the checkout's editable
# hook among them, are not run). Installing the dependencies too (offline, from the local wheels) takes over a minute
# and tests pip, not the site's pinning.

_WHEEL_SITE_PRELUDE = """
import importlib.util, sys
from pathlib import Path
site, fab = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
for top in ("oncofed", "client", "server", "shared_models", "privacy", "simulations"):
    where = Path(importlib.util.find_spec(top).origin)
    assert site in where.parents, f"{top} from {where}, not the wheel's install in {site}"
"""


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> tuple[Path, Path]:
    """(the venv's python, its site-packages) with OncoFed installed from a wheel built from this checkout."""
    import importlib.util
    import shutil
    import site

    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("building OncoFed's wheel offline needs pip and setuptools (the build backend) in this Python")
    tmp = tmp_path_factory.mktemp("wheel-site")
    shutil.copytree(ROOT, tmp / "src", ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "*.egg-info", "__pycache__", "docs", "tests", "benchmarks", "runs"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist",
                            tmp / "src"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("oncofed-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], check=True)
    python = tmp / "venv" / "bin" / "python"
    installed = subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    (purelib / "test-dependencies.pth").write_text("\n".join(deps) + "\n")
    return python, purelib


def _in_wheel_site(wheel_site, code: str, fab: bytes, tmp_path: Path) -> str:
    """What `code` prints, run by the wheel site's Python from a directory outside any checkout, `fab` and `site`
    (its site-packages) defined."""
    import os

    python, purelib = wheel_site
    (tmp_path / "app.fab").write_bytes(fab)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"FLWR_HOME": str(tmp_path / "flwr")}
    run = subprocess.run([python, "-c", _WHEEL_SITE_PRELUDE + code, purelib, tmp_path / "app.fab"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.slow
def test_a_site_installed_from_the_wheel_accepts_the_app_built_from_the_checkout(wheel_site, tmp_path):
    """The operator's `flwr run` packs the checkout's files and pyproject.toml, which a wheel does not install: the
    app still compares equal, file by file, with the site's installation (the pyproject by its ClientApp, name and
    version)."""
    code = "from client.clientapp_process import foreign_code; print(foreign_code(fab))"
    assert _in_wheel_site(wheel_site, code, _own_fab(), tmp_path) == "[]"


@pytest.mark.slow
def test_a_site_installed_from_the_wheel_refuses_a_changed_line_naming_the_file(wheel_site, tmp_path):
    def no_noise(name, data):
        return data.replace(b"def run_noise(", b"def run_noise_(") if name == "client/local_round.py" else data

    code = ("from client.clientapp_process import ForeignAppError, check_app\n"
            "try:\n    check_app(fab)\nexcept ForeignAppError as e:\n    print(e)")
    out = _in_wheel_site(wheel_site, code, _changed(_own_fab(), no_noise), tmp_path)
    assert "1 of its files differ" in out and "(client/local_round.py)" in out, out


@pytest.mark.slow
def test_a_site_installed_from_the_wheel_loads_its_installed_clientapp(wheel_site, tmp_path):
    code = ("import client.app\nfrom client.clientapp_process import checked\n"
            "path = list(sys.path)\n_, install_from_fab, get_load_client_app_fn = checked(None)\n"
            "install_from_fab(fab, skip_prompt=True)\n"
            "app = get_load_client_app_fn(default_app_ref='', app_path=None, multi_app=True)('oncofed/oncofed', "
            "'0.1.0', '')\n"
            "print(app is client.app.app, sys.path == path, Path(client.app.__file__).parent.parent == site)")
    assert _in_wheel_site(wheel_site, code, _own_fab(), tmp_path) == "True True True"
    assert not (tmp_path / "flwr").exists()


@pytest.mark.slow
def test_a_site_installed_from_the_wheel_passes_the_launcher_preflight(wheel_site, tmp_path):
    """`oncofed site start`'s check: the wheel installs `oncofed-clientapp` beside the site's Python, and it runs."""
    python, _ = wheel_site
    code = "from client.supernode import clientapp_check; print(clientapp_check().ok)"
    assert _in_wheel_site(wheel_site, code, b"", tmp_path) == "True"
    launcher = subprocess.run([python.with_name("oncofed-clientapp"), "--help"], cwd=tmp_path, capture_output=True,
                              text=True)
    assert launcher.returncode == 0 and "usage: flwr-clientapp" in launcher.stdout, launcher.stderr


@pytest.mark.slow
def test_an_operator_installed_from_the_wheel_creates_a_consortium_with_the_default_schema(wheel_site, tmp_path):
    """`oncofed consortium init` read the default schema's name from pyproject.toml, which a wheel does not install:
    a RunConfigError traceback. It now comes from shared_models.run_config.APP_SCHEMA, installed with the wheel."""
    code = ("from privacy.pki import init_consortium\n"
            "init_consortium(Path('op'), 'test consortium', '127.0.0.1:19092', internal_port=19093)\n"
            "print(sorted(p.name for p in (Path('op') / 'public').iterdir()))")
    out = _in_wheel_site(wheel_site, code, b"", tmp_path)
    assert "schema.json" in out or "feature-schema.json" in out, out
