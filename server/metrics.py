"""Prometheus metrics of the consortium server (prometheus-client), served by `oncofed server start`.

Each ServerApp writes RUN_DIR/status.json atomically after every round (server/app.py); the
collector reads the most recent run's status at scrape time, and the SuperLink's view of the
registered sites (`flwr supernode ls`) refreshed in the background every 30 s. Nothing here can
stop or slow a training run: a scrape only reads files.

    oncofed_rounds_completed{run}              rounds aggregated in the current run
    oncofed_round_duration_seconds{run}        duration of its last round
    oncofed_sites_registered / _online         sites the SuperLink knows / sees online
    oncofed_sites_participating{run}           sites whose update entered the last aggregate
    oncofed_site_epsilon{site}                 cumulative epsilon each site reported
    oncofed_model_info{run,round,sha256}       the current global model (value 1)
    oncofed_run_finished{run}                  1 when the final model was delivered
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

SITES_REFRESH_SECONDS = 30.0


def latest_status(runs: Path) -> dict | None:
    best, best_t = None, -1.0
    for f in runs.glob("*/status.json"):
        try:
            t = f.stat().st_mtime
            if t > best_t:
                best, best_t = json.loads(f.read_text()), t
        except (OSError, ValueError):
            continue  # being replaced: the next scrape reads it
    return best


class ConsortiumCollector:
    def __init__(self, runs: Path, list_sites=None):
        self.runs = runs
        self._list_sites = list_sites
        self._sites: list[dict] | None = None
        self._sites_error = ""
        if list_sites is not None:
            threading.Thread(target=self._refresh_sites, daemon=True, name="oncofed-sites").start()

    def _refresh_sites(self) -> None:
        while True:
            try:
                self._sites, self._sites_error = self._list_sites(), ""
            except Exception as e:  # noqa: BLE001 - a scrape must never fail because the SuperLink is busy
                self._sites_error = str(e)
            time.sleep(SITES_REFRESH_SECONDS)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        status = latest_status(self.runs)
        if self._sites is not None:
            yield GaugeMetricFamily("oncofed_sites_registered", "sites registered with the SuperLink",
                                    value=len(self._sites))
            yield GaugeMetricFamily("oncofed_sites_online", "registered sites the SuperLink sees online",
                                    value=sum(s.get("status") == "online" for s in self._sites))
        if status is None:
            return
        run = str(status.get("run", ""))
        for name, doc, key in (("oncofed_rounds_completed", "rounds aggregated in the current run", "round"),
                               ("oncofed_round_duration_seconds", "duration of the last round", "round_seconds"),
                               ("oncofed_sites_participating", "sites in the last aggregate", "participating"),
                               ("oncofed_run_finished", "1 once the final model was delivered", "finished")):
            g = GaugeMetricFamily(name, doc, labels=["run"])
            g.add_metric([run], float(status.get(key) or 0))
            yield g
        eps = GaugeMetricFamily("oncofed_site_epsilon", "cumulative epsilon each site reported", labels=["site"])
        for site, value in sorted((status.get("site_epsilon") or {}).items()):
            eps.add_metric([site], float(value))
        yield eps
        info = InfoMetricFamily("oncofed_model", "the current global model")
        info.add_metric([], {"run": run, "round": str(status.get("round", 0)),
                             "sha256": str(status.get("weights_sha256", ""))})
        yield info


def serve_metrics(consortium, port: int, host: str = "127.0.0.1"):
    """Expose /metrics on host:port in a background thread (loopback: the operator's Prometheus scrapes it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from privacy.registry import list_sites

    registry = CollectorRegistry()
    registry.register(ConsortiumCollector(consortium.path("runs"), lambda: list_sites(consortium.root)))
    return start_http_server(port, addr=host, registry=registry)
