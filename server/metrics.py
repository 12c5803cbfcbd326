"""Prometheus metrics of the consortium server (prometheus-client), served by `oncofed server start`.

Each ServerApp writes RUN_DIR/status.json atomically after every round (server/app.py); the
collector reads the most recent run's status at scrape time, and the registered sites' status from
the SuperLink's database, opened read-only for one query (server/runs.py). No process is started
(this used to spawn `flwr supernode ls` every 30 s, ~20% of a core). Nothing here can stop or slow a
training run: a scrape only reads files.

    oncofed_rounds_completed{run}              rounds aggregated in the current run
    oncofed_round_duration_seconds{run}        duration of its last round
    oncofed_sites_registered / _online         sites the SuperLink knows / sees online (its database)
    oncofed_sites_participating{run}           sites whose update entered the last aggregate
    oncofed_site_epsilon{site}                 cumulative epsilon each site reported
    oncofed_site_epsilon_worst_case{site}      dp-mode distributed: each site's epsilon from its own noise share alone
    oncofed_model_info{run,round,sha256}       the current global model (value 1)
    oncofed_run_finished{run}                  1 once training finished and delivery was tried
    oncofed_sites_trained{run}                 sites whose update entered an aggregate of the run
    oncofed_sites_delivered{run}               sites that installed its final model
    oncofed_run_delivery_ok{run}               1 once every site that trained installed it (else `oncofed deliver`)
    oncofed_server_process_up{process}         superlink / superexec / proxy running (server.json)
    oncofed_server_process_restarts{process}   how often `oncofed server start` restarted each
"""

from __future__ import annotations

import json
from pathlib import Path
from server.run_files import RUN_FILE


def latest_status(runs: Path) -> dict | None:
    """The status of the run started last: its run.json is written once, when the run starts (a resume keeps
    it), so `oncofed deliver` of an earlier run, which rewrites that run's status.json, does not make it the
    current one. A run directory without run.json counts by its status.json's time."""
    best, best_t = None, -1.0
    for f in runs.glob("*/status.json"):
        try:
            started = f.with_name(RUN_FILE)
            t = (started if started.exists() else f).stat().st_mtime
            if t > best_t:
                best, best_t = json.loads(f.read_text()), t
        except (OSError, ValueError):
            continue  # being replaced: the next scrape reads it
    return best


class ConsortiumCollector:
    def __init__(self, runs: Path, list_sites=None):
        """`list_sites`: a callable returning the registered sites with their `status`, called at scrape
        time (it must be cheap: server.runs reads the SuperLink's database), or None."""
        self.runs = runs
        self._list_sites = list_sites

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        from server.deploy import server_state

        status = latest_status(self.runs)
        server = server_state(self.runs.parent)
        if server.get("components"):
            up = GaugeMetricFamily("oncofed_server_process_up", "1 while the supervised process runs",
                                   labels=["process"])
            restarts = GaugeMetricFamily("oncofed_server_process_restarts", "restarts since the server started",
                                         labels=["process"])
            for name, comp in sorted(server["components"].items()):
                up.add_metric([name], float(bool(comp.get("up"))))
                restarts.add_metric([name], float(comp.get("restarts", 0)))
            yield up
            yield restarts
        sites = self._list_sites() if self._list_sites is not None else None
        if sites is not None:
            yield GaugeMetricFamily("oncofed_sites_registered", "sites registered with the SuperLink",
                                    value=len(sites))
            yield GaugeMetricFamily("oncofed_sites_online", "registered sites the SuperLink sees online",
                                    value=sum(s.get("status") == "online" for s in sites))
        if status is None:
            return
        run = str(status.get("run", ""))
        for name, doc, key in (("oncofed_rounds_completed", "rounds aggregated in the current run", "round"),
                               ("oncofed_round_duration_seconds", "duration of the last round", "round_seconds"),
                               ("oncofed_sites_participating", "sites in the last aggregate", "participating"),
                               ("oncofed_run_finished", "1 once training finished and delivery was tried", "finished"),
                               ("oncofed_sites_trained", "sites whose update entered an aggregate of the run", "trained"),
                               ("oncofed_sites_delivered", "sites that installed the run's final model", "delivered"),
                               ("oncofed_run_delivery_ok", "1 once every site that trained installed the final model "
                                "(alert on oncofed_run_finished == 1 and this == 0: `oncofed deliver`)", "delivery_ok")):
            g = GaugeMetricFamily(name, doc, labels=["run"])
            g.add_metric([run], float(status.get(key) or 0))
            yield g
        eps = GaugeMetricFamily("oncofed_site_epsilon", "cumulative epsilon each site reported", labels=["site"])
        for site, value in sorted((status.get("site_epsilon") or {}).items()):
            eps.add_metric([site], float(value))
        yield eps
        if status.get("site_epsilon_worst_case"):
            worst = GaugeMetricFamily("oncofed_site_epsilon_worst_case", "dp-mode distributed: each site's epsilon "
                                      "if only its own noise share protected it", labels=["site"])
            for site, value in sorted(status["site_epsilon_worst_case"].items()):
                worst.add_metric([site], float(value))
            yield worst
        info = InfoMetricFamily("oncofed_model", "the current global model")
        info.add_metric([], {"run": run, "round": str(status.get("round", 0)),
                             "sha256": str(status.get("weights_sha256", ""))})
        yield info


def serve_metrics(consortium, port: int, host: str = "127.0.0.1"):
    """Expose /metrics on host:port in a background thread (loopback: the operator's Prometheus scrapes it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from server.runs import read_superlink, registered_sites

    def sites():
        superlink = read_superlink(consortium.path("state", "superlink.db"))
        return None if superlink is None else registered_sites(consortium.root, superlink)

    registry = CollectorRegistry()
    registry.register(ConsortiumCollector(consortium.path("runs"), sites))
    return start_http_server(port, addr=host, registry=registry)
