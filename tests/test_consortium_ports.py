"""Two consortia on one machine: every port `oncofed server start` listens on comes from the consortium's own settings,
and a port another consortium's server holds is named, with the setting and a free port, at `consortium init`, at the
server's preflight and by the operator's commands, instead of a bind failure or talking to the other's SuperLink."""

from __future__ import annotations

import json

import psutil
import pytest
from typer.testing import CliRunner

from oncofed.cli import app
from privacy.pki import ProvisioningError, init_consortium
from privacy.registry import flwr_home, list_sites
from server.deploy import Consortium, server_checks, service_env, superexec_command
from server.processes import free_port, secure_superlink_command, start_group, stop_group, wait_healthy

pytestmark = pytest.mark.slow


def _superlink(c: Consortium):
    """The consortium's SuperLink as `oncofed server start` runs it (its command and environment), without the proxy."""
    c.path("state").mkdir(exist_ok=True)
    proc = start_group(secure_superlink_command(c.path("ca", "ca.crt"), c.path("server", "server.crt"),
                                                c.path("server", "server.key"), c.path("state", "superlink.db"),
                                                c.internal_port), service_env(), c.root, c.path("superlink.log"))
    try:
        wait_healthy(c.control_address, c.path("ca", "ca.crt"), proc, 60, "the SuperLink", c.path("superlink.log"))
    except BaseException:
        stop_group(proc)
        raise
    return proc


@pytest.fixture
def two(tmp_path):
    """Consortia A and B with the same SuperLink port (as the default, 9092, gives both), A's SuperLink running."""
    port = free_port()
    for name in ("a", "b"):
        init_consortium(tmp_path / name, name, f"127.0.0.1:{free_port()}", internal_port=port)
    a, b = Consortium.load(tmp_path / "a"), Consortium.load(tmp_path / "b")
    proc = _superlink(a)
    yield a, b
    stop_group(proc, grace=30)


def test_the_superlink_listens_on_its_control_address_port_alone(tmp_path, monkeypatch):
    # Flower's switches for its legacy gRPC Control and Fleet APIs would add 0.0.0.0:9093 and 0.0.0.0:9092, ports no
    # consortium setting names (and the Control API open on every interface): off whatever the environment says
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    init_consortium(tmp_path / "a", "a", f"127.0.0.1:{free_port()}", internal_port=free_port())
    c = Consortium.load(tmp_path / "a")
    proc = _superlink(c)
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        listening = {(k.laddr.ip, k.laddr.port) for p in tree for k in p.net_connections("tcp")
                     if k.status == psutil.CONN_LISTEN}
    finally:
        stop_group(proc, grace=30)
    assert listening == {("127.0.0.1", c.internal_port)}


def test_a_second_consortium_on_the_superlink_port_of_a_running_one_is_refused_at_init(two, tmp_path):
    a, _ = two
    res = CliRunner().invoke(app, ["consortium", "init", str(tmp_path / "c"), "--name", "c", "--address",
                                   f"127.0.0.1:{free_port()}", "--internal-port", str(a.internal_port)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and f"the SuperLink of the consortium at {a.root}" in out, res.output
    assert "--internal-port" in out and "Nothing was written" in out and not (tmp_path / "c").exists()


def test_a_consortium_whose_superlink_port_another_one_holds_is_told_so_and_how_to_move(two):
    a, b = two
    failed = {c.name: c.detail for c in server_checks(b) if not c.ok}
    detail = failed[f"SuperLink loopback address 127.0.0.1:{a.internal_port}"]
    assert f"the SuperLink of the consortium at {a.root}" in detail
    assert f'"control-address" in {b.path("consortium.json")}' in detail and "e.g. " in detail
    # its operator's commands do not talk to A's SuperLink: they say whose it is and what to set
    with pytest.raises(ProvisioningError, match="is not this consortium's SuperLink.*control-address"):
        list_sites(b.root)
    # the fix it names: B's one setting, which every part of B reads (its SuperLink, SuperExec, proxy, flwr commands)
    port = int(detail.split("e.g. ")[1].split()[0].rstrip(",;."))
    record = json.loads(b.path("consortium.json").read_text())
    b.path("consortium.json").write_text(json.dumps({**record, "control-address": f"127.0.0.1:{port}"}))
    b = Consortium.load(b.root)
    assert all(c.ok for c in server_checks(b) if c.name.startswith("SuperLink loopback")), server_checks(b)
    assert f'address = "127.0.0.1:{port}"' in (flwr_home(b.root) / "config.toml").read_text()
    assert f"--runtime-api-address 127.0.0.1:{port}" in " ".join(superexec_command(b, 1))


def test_a_consortium_whose_own_ports_coincide_is_told_which_settings(tmp_path):
    port = free_port()
    init_consortium(tmp_path / "a", "a", f"127.0.0.1:{free_port()}", internal_port=port)
    failed = {c.name: c.detail for c in server_checks(Consortium.load(tmp_path / "a"), metrics_port=port) if not c.ok}
    detail = failed[f"metrics (--metrics-port) address 127.0.0.1:{port}"]
    assert "the same port as the SuperLink loopback address" in detail and "control-address" in detail
    assert "set --metrics-port to another port" in detail


def test_a_second_server_start_names_the_running_consortiums_own_proxy_not_a_stranger(tmp_path):
    """psutil names nginx's worker (no arguments) as the listener: the port was blamed on "pid N (nginx)", with the
    advice to re-address the consortium, which would cut off every site; its master (`-p DIR/proxy`) is this one's."""
    import time

    from server import proxy
    from server.deploy import port_checks

    root = tmp_path / "op"
    init_consortium(root, "c", f"127.0.0.1:{free_port()}", internal_port=free_port())
    c = Consortium.load(root)
    host, port = c.public
    proxy.write_config(c.root, host, port, c.internal_port)
    nginx = start_group(proxy.nginx_command(c.root), service_env(), c.root, c.path("proxy.log"))
    try:
        for _ in range(100):
            listeners = {k.pid for k in psutil.net_connections(kind="tcp")
                         if k.status == psutil.CONN_LISTEN and k.laddr and k.laddr.port == port}
            if listeners and listeners != {nginx.pid}:  # a worker listens too
                break
            time.sleep(0.1)
        public = next(k for k in port_checks(c) if k.name.startswith("public"))
        assert not public.ok and f"the proxy (nginx) of the consortium at {c.root} (pid {nginx.pid})" in public.detail
        assert f"its server runs already (`oncofed server stop {c.root}`)" in public.detail
        assert '"address"' not in public.detail
    finally:
        stop_group(nginx)
