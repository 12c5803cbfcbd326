"""Prometheus metrics of the consortium server (prometheus-client), served by `oncofed server start`.

Each ServerApp writes RUN_DIR/status.json atomically after every round (server/app.py); the
collector reads the runs' status files at scrape time, and the registered sites' and the runs' status
from the SuperLink's database, opened read-only once per scrape (server/runs.py). No process is started
(this used to spawn `flwr supernode ls` every 30 s, ~20% of a core). Nothing here can stop or slow a
training run: a scrape only reads files.

Per-run gauges (labels `run`, the run's name that `oncofed deliver` and `oncofed runs` take, and `run_key`) for
the run started last, every run whose final model some site that trained has not installed, and every run the
SuperLink has pending or running (exported_runs); the sites' epsilon and the model of the run started last:

    oncofed_rounds_completed{run,run_key}        rounds the run has ended (whether or not they changed the model)
    oncofed_rounds_updated{run,run_key}          rounds whose aggregate updated the global model (a refused or
                                                 abandoned round does not)
    oncofed_round_duration_seconds{run,run_key}  duration of its last round
    oncofed_sites_registered / _online           sites the SuperLink knows / sees online (its database)
    oncofed_sites_participating{run,run_key}     sites whose update entered the last aggregate
    oncofed_site_epsilon{site}                   cumulative epsilon each site reported
    oncofed_site_run_epsilon{site}               each site's epsilon of the run's rounds alone (the model's own)
    oncofed_site_epsilon_worst_case{site}        dp-mode distributed: each site's epsilon from its own noise share alone
    oncofed_model_info{run,run_key,round,sha256} the global model of the run started last (value 1), once a round
                                                 updated it (the untrained initial model is no run's model)
    oncofed_run_finished{run,run_key}            1 once training finished with a model and delivery was tried
    oncofed_run_failed{run,run_key}              1: training ended without a model, no site trained (e.g. every site
                                                 refused every round): fix it at the sites, then a new run
    oncofed_sites_trained{run,run_key}           sites whose update entered an aggregate of the run
    oncofed_sites_delivered{run,run_key}         sites that installed its final model
    oncofed_run_delivery_ok{run,run_key}         1 once every site that trained installed it (else `oncofed deliver`)
    oncofed_server_process_up{process}         superlink / superexec / proxy running (server.json)
    oncofed_server_process_restarts{process}   how often `oncofed server start` restarted each
"""

from __future__ import annotations

import json
from pathlib import Path
from server.run_files import RUN_FILE


def run_statuses(runs: Path) -> list[tuple[str, dict]]:
    """(run name, status.json) of every run directory, the run started last at the end. A run's run.json is written
    once, when it starts (a resume keeps it), so `oncofed deliver` of an earlier run, which rewrites that run's
    status.json, does not make it the newest. A run directory without run.json counts by its status.json's time. The
    delivery fields are as the register stands now (a site removed since is not undelivered: delivery_now)."""
    from server.delivery import delivery_now

    found = []
    for f in runs.glob("*/status.json"):
        try:
            started = f.with_name(RUN_FILE)
            found.append(((started if started.exists() else f).stat().st_mtime, f.parent.name,
                          delivery_now(f.parent, json.loads(f.read_text()))))
        except (OSError, ValueError):
            continue  # being replaced: the next scrape reads it
    return [(name, status) for _, name, status in sorted(found, key=lambda x: (x[0], x[1]))]


def latest_status(runs: Path) -> dict | None:
    """The status of the run started last."""
    statuses = run_statuses(runs)
    return statuses[-1][1] if statuses else None


def ended_without_model(status: dict) -> bool:
    """Training ended without a model: no round updated it (server.runs.no_model says why and what to do)."""
    return bool(status.get("finished")) and "trained" in status and not status["trained"]


def has_model(status: dict) -> bool:
    """A round updated the run's global model (status.json's `model_updated`; a status written before it was kept:
    any but a run that ended without one)."""
    return bool(status.get("model_updated", not ended_without_model(status)))


def undelivered(status: dict) -> bool:
    """Training finished with a model that some site that trained has not installed: `oncofed deliver` is due. (A run
    that ended without a model trained no site: there is nothing to deliver.)"""
    return bool(status.get("finished")) and not status.get("delivery_ok") and bool(status.get("trained"))


def exported_runs(runs: Path, live: set[str] = frozenset()) -> list[tuple[str, dict]]:
    """The runs whose gauges /metrics serves, the run started last at the end: that one, every run whose final
    model some site that trained has not installed (its alert stays until `oncofed deliver` completes it), and every
    run the SuperLink has pending or running (`live`, by name). A run finished and delivered drops out once a later
    one starts, and so does one that stopped unfinished: the series stay few."""
    statuses = run_statuses(runs)
    return [(name, status) for i, (name, status) in enumerate(statuses)
            if i == len(statuses) - 1 or undelivered(status) or name in live]


class ConsortiumCollector:
    def __init__(self, runs: Path, list_sites=None, live_runs=None, unfinished_runs=None, superlink=None):
        """`superlink`: a callable returning the SuperLink's state (server.runs.read_superlink: its database opened
        read-only), called once per scrape so that one scrape reads it once and its gauges agree; its result (None
        without it) is the argument of the next three. `list_sites(superlink)`: the registered sites with their
        `status`, or None. `live_runs(superlink)`: the names of the runs the SuperLink has pending or running, or None.
        `unfinished_runs(superlink)`: the names of the runs whose training ended failed or stopped without a result, or
        None. Each is called at scrape time: they must be cheap."""
        self.runs = runs
        self._list_sites = list_sites
        self._live_runs = live_runs
        self._unfinished_runs = unfinished_runs
        self._superlink = superlink

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        from server.deploy import server_state

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
        superlink = self._superlink() if self._superlink is not None else None
        sites = self._list_sites(superlink) if self._list_sites is not None else None
        if sites is not None:
            yield GaugeMetricFamily("oncofed_sites_registered", "sites registered with the SuperLink",
                                    value=len(sites))
            yield GaugeMetricFamily("oncofed_sites_online", "registered sites the SuperLink sees online",
                                    value=sum(s.get("status") == "online" for s in sites))
        if self._unfinished_runs is not None:  # a run the server's restart ended looks like a slow one otherwise
            unfinished = GaugeMetricFamily(
                "oncofed_run_unfinished", "1: the run's training ended (failed, stopped, or the server's exit ended "
                "it) without finishing; nothing goes on until `oncofed run CONSORTIUM --name RUN --resume`",
                labels=["run"])
            for name in sorted(self._unfinished_runs(superlink)):
                unfinished.add_metric([name], 1.0)
            yield unfinished
        runs = exported_runs(self.runs, self._live_runs(superlink) if self._live_runs is not None else set())
        if not runs:
            return
        # `run`: the run's name (its directory; what `oncofed deliver` and `oncofed runs` take); `run_key`: the key
        # its records and the sites' ledgers carry
        for metric, doc, key in (
                ("oncofed_rounds_completed", "rounds the run has ended, whether or not they changed the model "
                 "(oncofed_rounds_updated: those that did)", "round"),
                ("oncofed_rounds_updated", "rounds whose aggregate updated the run's global model (a round every site "
                 "refused, or abandoned, does not)", "rounds_updated"),
                ("oncofed_round_duration_seconds", "duration of the run's last round", "round_seconds"),
                ("oncofed_sites_participating", "sites in the run's last aggregate", "participating"),
                ("oncofed_run_finished", "1 once training finished with a model and delivery was tried (a run "
                 "that ended without one: oncofed_run_failed)", "finished"),
                ("oncofed_sites_trained", "sites whose update entered an aggregate of the run", "trained"),
                ("oncofed_sites_delivered", "sites that installed the run's final model", "delivered"),
                ("oncofed_run_delivery_ok", "1 once every site that trained installed the final model (alert on "
                 "oncofed_run_finished == 1 and this == 0 and oncofed_sites_trained > 0: `oncofed deliver "
                 "CONSORTIUM RUN`)", "delivery_ok")):
            g = GaugeMetricFamily(metric, doc, labels=["run", "run_key"])
            for name, status in runs:
                if key not in status and key == "rounds_updated":  # a status.json written before it was kept
                    continue
                value = 0 if key == "finished" and ended_without_model(status) else status.get(key)  # oncofed_run_failed's
                g.add_metric([name, str(status.get("run", ""))], float(value or 0))
            yield g
        failed = GaugeMetricFamily("oncofed_run_failed", "1: the run's training ended without a model (no site "
                                   "trained, e.g. every site refused every round); nothing to deliver or resume: fix "
                                   "it at the sites, then start a new run", labels=["run", "run_key"])
        for name, status in runs:
            failed.add_metric([name, str(status.get("run", ""))], float(ended_without_model(status)))
        yield failed
        name, status = runs[-1]  # the run started last: its sites' epsilon and global model
        for metric, key, what in (
                ("oncofed_site_epsilon", "site_epsilon", "cumulative epsilon each site reported"),
                ("oncofed_site_run_epsilon", "site_run_epsilon", "each site's epsilon of this run's rounds alone: "
                 "what the run's model costs its patients by itself"),
                ("oncofed_site_epsilon_worst_case", "site_epsilon_worst_case", "dp-mode distributed: each site's "
                 "epsilon if only its own noise share protected it")):
            if metric == "oncofed_site_epsilon" or status.get(key):  # (the first always: it may be empty)
                family = GaugeMetricFamily(metric, what, labels=["site"])
                for site, value in sorted((status.get(key) or {}).items()):
                    family.add_metric([site], float(value))
                yield family
        if not has_model(status):  # its weights are the untrained initial ones: no model to name
            return
        info = InfoMetricFamily("oncofed_model", "the global model of the run started last")
        info.add_metric([], {"run": name, "run_key": str(status.get("run", "")), "round": str(status.get("round", 0)),
                             "sha256": str(status.get("weights_sha256", ""))})
        yield info


def serve_metrics(consortium, port: int, host: str = "127.0.0.1"):
    """Expose /metrics on host:port in a background thread (loopback: the operator's Prometheus scrapes it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from server.runs import live_run_names, read_superlink, registered_sites, unfinished_run_names

    def superlink():  # once per scrape: the collector passes it to the three below
        return read_superlink(consortium.path("state", "superlink.db"))

    def sites(superlink):
        return None if superlink is None else registered_sites(consortium.root, superlink)

    def live(superlink):
        return live_run_names(consortium.root, superlink)

    def unfinished(superlink):
        return unfinished_run_names(consortium.root, superlink)

    registry = CollectorRegistry()
    registry.register(ConsortiumCollector(consortium.path("runs"), sites, live, unfinished, superlink))
    return start_http_server(port, addr=host, registry=registry)
