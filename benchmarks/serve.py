"""Load on the site prediction service: a real `oncofed serve` process on loopback, real patients.

The model is the pan-cancer architecture (schema of the vendored cohort, default ModelConfig): the
active model of `--site-state` (e.g. runs/main/state/C0 after the README's main job) or, without
it, freshly initialised weights (latency does not depend on weight values). Patients are the
vendored cohort's held-out patients, normalised with the statistics of hospital C0.

Measured in this one invocation, against real `oncofed serve` processes on loopback:
    single     one patient per request, no explanations, at 1, 16 and 64 concurrent connections: p50 / p99
               latency and predictions per minute (targets at 16: p99 <= 30 ms, >= 40,000 / min, quiet machine)
    +explain   the same at 1, 16 and 64 connections while 2 more clients ask for 300-patient explanations
               (target: prediction p99 at 16 at most 1.2x the baseline's)
    no window  16 connections against a second server with `serve.batch-window-ms = 0` instead of the default 2
               ms (a batching window like Triton's max_queue_delay, waiting only for as many requests as the
               last batch held)
    inline     1 and 16 connections against a third server with `serve.input-check = "inline"` (requests parsed and
               checked on the event loop) instead of the default "process" (client/input_process.py)
    batch      4 clients, 100 patients per request: patients per second
    cli        `oncofed predict` over the whole held-out directory: patients per second (target >= 1,000)
    pairs      `--pairs` N more back-to-back pairs at 16 connections, without then with the explanation load:
               the targets at 16 use the median p99 and throughput over every 16-connection row without
               explanations, and the median of the pairs' p99 ratios (one row is one sample of a noisy machine)
Ratios are against the baseline row (16 connections, no explanations, the default window) of the same run;
the machine's load average is printed with the figures. Each load is an asyncio client (raw HTTP/1.1
keep-alive connections) in a process of its own, on the same cores as the server. Ends with one JSON line.

    python benchmarks/serve.py [--seconds 10] [--site-state DIR] [--pairs 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(work: Path, site_state: Path | None) -> tuple[dict, Path, list[dict]]:
    import torch

    from client.model_store import ModelStore
    from client.predict import Predictor
    from client.serve import TOKENS_FILE, TokenStore
    from privacy.site_config import SiteConfig
    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import ModelConfig
    from shared_models.schema import FeatureSchema
    from shared_models.site_data import Normalizer, raw_matrix, read_site
    from shared_models.weights import state_arrays
    from simulations.federation import ensure_partition

    data = ensure_partition(work / "data")
    schema = FeatureSchema.load(data / "schema.json")
    state = work / "state"
    state.mkdir(parents=True, exist_ok=True)
    if site_state is not None:
        model_dir = site_state / "models"
        Normalizer.load(site_state / "state" / "normalizer.json", schema).save(state / "normalizer.json")
        source = f"trained model {ModelStore(model_dir).active()} from {site_state}"
    else:
        model_dir = work / "models"
        torch.manual_seed(0)
        cfg = ModelConfig()  # the model outside a run (2 fusion blocks; a site-mode DP run trains 1)
        model = MultiModalTransformer(schema, cfg)
        ModelStore(model_dir).install(schema, cfg, state_arrays(model), {"run": "benchmark", "round": 0})
        tables = read_site(schema, data / "C0")
        Normalizer.fit(schema, raw_matrix(schema, tables)).save(state / "normalizer.json")
        source = f"initial weights ({model.num_parameters():,} parameters)"
    site = SiteConfig(model_dir=str(model_dir), state_dir=str(state), simulated=True)  # an unsigned benchmark model
    site.write(work / "site.json")
    settings = {"site": site, "source": source, "token": TokenStore(state / TOKENS_FILE).add("bench", "clinician")}
    # JSON patients from the held-out directory
    pred = Predictor(model_dir, state / "normalizer.json")
    checked = pred.checked_tables(data / "holdout")
    ids, raw = checked.ids, checked.raw
    layout = schema.layout()
    patients = []
    for i in range(len(ids)):
        mods = {}
        for m in schema.modalities:
            block = raw[i, layout.slices[m.name]]
            if np.isnan(block).all():
                continue
            vals = {}
            for f, v in zip(m.features, block):
                if np.isnan(v):
                    continue
                if m.column_type(f).value == "categorical":
                    vals[f] = m.levels[f][int(v)]
                elif m.transform.value == "log1p" and m.column_type(f).value == "numeric":
                    vals[f] = float(np.expm1(v))
                else:
                    vals[f] = float(v)
            mods[m.name] = vals
        patients.append({"id": ids[i], "modalities": mods})
    return settings, data / "holdout", patients


CLI_COPIES = 8


def replicate(src: Path, dst: Path, copies: int) -> Path:
    """The held-out tables repeated `copies` times with distinct patient ids: a larger batch job."""
    import pandas as pd

    dst.mkdir()
    for f in sorted(src.iterdir()):
        tsv = ".tsv" in f.suffixes
        if not f.name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")):
            continue
        df = pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f, sep="\t" if tsv else ",")
        first = df.columns[0]
        parts = []
        for k in range(copies):
            part = df.copy()
            part[first] = part[first].astype(str) + f"-{k}"
            parts.append(part)
        out = pd.concat(parts)
        if f.suffix == ".parquet":
            out.to_parquet(dst / f.name, index=False)
        else:
            out.to_csv(dst / f.name, index=False, sep="\t" if tsv else ",")
    return dst


def _client(port: int, requests: list[bytes], clients: int, seconds: float, out) -> None:
    """In its own process: `clients` keep-alive connections on one asyncio loop (uvloop if installed),
    each sending the prebuilt `requests` in turn for `seconds`; sends (latencies in s, non-200 count, its wall
    seconds) to `out`.
    Raw HTTP/1.1 on sockets costs the shared cores far less per request than http.client threads."""
    import asyncio

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def connection(k: int, stop: float, lat: list, errors: list) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.time() < stop:
            t = time.perf_counter()
            writer.write(requests[i % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head[9:12] == b"200":  # an answer: a refusal (429, 503) is fast and predicts nothing
                lat.append(time.perf_counter() - t)
            else:
                errors[0] += 1
            i += clients
        writer.close()

    async def run() -> tuple[list, int, float]:
        lat, errors = [], [0]
        t0 = time.perf_counter()
        stop = time.time() + seconds
        await asyncio.gather(*(connection(k, stop, lat, errors) for k in range(clients)))
        return lat, errors[0], time.perf_counter() - t0

    out.send(asyncio.run(run()))
    out.close()


def load(port: int, token: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` connections posting `bodies` in turn for `seconds`, from a client process of their own."""
    import multiprocessing as mp

    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()
    requests = [head + str(len(b)).encode() + b"\r\n\r\n" + b for b in bodies]
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client, args=(port, requests, clients, seconds, send), daemon=True)
    proc.start()
    send.close()
    lat, errors, wall = recv.recv()
    proc.join()
    a = np.array(lat or [float("nan")]) * 1000
    return {"connections": clients, "requests": len(lat), "errors": errors,
            "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "requests_per_s": round(len(lat) / wall, 1), "predictions_per_min": round(len(lat) / wall * 60),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def with_explanations(port: int, token: str, single: list[bytes], explain_body: bytes, seconds: float,
                      connections: int = 16) -> dict:
    """Single-patient load at `connections` while 2 clients keep 300-patient explanations in flight."""
    background = {}
    t = threading.Thread(target=lambda: background.update(load(port, token, [explain_body], 2, seconds + 2.0)))
    t.start()
    time.sleep(1.0)  # the explanations are in flight before the measurement starts
    res = load(port, token, single, connections, seconds)
    t.join()
    res["explanation_requests"] = background.get("requests", 0)  # answered ones
    res["errors"] += background.get("errors", 0)
    return res


def start_server(work: Path, settings: dict, name: str, serve: dict) -> tuple[subprocess.Popen, int]:
    from privacy.site_config import SiteConfig
    from server.processes import free_port

    site = settings["site"]
    if serve:
        site = SiteConfig.parse({**site.model_dump(by_alias=True, exclude_unset=True), "serve": serve})
    site.write(work / f"{name}.json")
    port = free_port()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    server = subprocess.Popen([sys.executable, "-m", "oncofed", "serve", "--site-config", str(work / f"{name}.json"),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(1200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--site-state", type=Path, default=None, help="a site's state root with models/ and state/")
    ap.add_argument("--pairs", type=int, default=3, help="back-to-back pairs (16 connections without, then with "
                    "the explanation load) after the table; the targets use their medians")
    args = ap.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    secs = args.seconds
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings, holdout, patients = prepare(work, args.site_state)
        token = settings["token"]
        single = [json.dumps({"patients": [p], "top_k": 0}).encode() for p in patients]
        explain_300 = json.dumps({"patients": patients[:300], "top_k": 5}).encode()
        batches = [json.dumps({"patients": patients[i:i + 100], "top_k": 0}).encode()
                   for i in range(0, len(patients) - 99, 100)]
        rows: dict[str, dict] = {}
        pairs: list[tuple[dict, dict]] = []
        server, port = start_server(work, settings, "none", {})
        try:
            load(port, token, single[:50], 4, 1.0)  # warm-up
            for n in (1, 16, 64):
                rows[f"single, {n} connection{'s' if n > 1 else ''}"] = load(port, token, single, n, secs)
            for n in (1, 16, 64):
                rows[f"single + 300-patient explanations, {n}"] = with_explanations(port, token, single, explain_300,
                                                                                    secs, n)
            rows["batches of 100 patients, 4"] = load(port, token, batches, 4, secs / 2)
            for _ in range(args.pairs):  # the explanation load's effect, from back-to-back rows
                pairs.append((load(port, token, single, 16, secs),
                              with_explanations(port, token, single, explain_300, secs, 16)))
        finally:
            server.terminate()
            server.wait(30)
        for label, serve, connections in (("no batch window", {"batch-window-ms": 0}, (16,)),
                                          ("input checked inline", {"input-check": "inline"}, (1, 16))):
            server, port = start_server(work, settings, "variant", serve)  # one default changed
            try:
                load(port, token, single[:50], 4, 1.0)
                for n in connections:
                    rows[f"single, {n}, {label}"] = load(port, token, single, n, secs)
            finally:
                server.terminate()
                server.wait(30)
        big = replicate(holdout, work / "big", CLI_COPIES)
        cli = {}
        for name, data in (("held-out", holdout), (f"held-out x{CLI_COPIES}", big)):
            out = work / "predictions.csv"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "oncofed", "predict", "--site-config", str(work / "site.json"),
                            "--data", str(data), "--out", str(out)], check=True, env=env, capture_output=True)
            cli[name] = (sum(1 for _ in out.open()) - 1, time.perf_counter() - t)
        (n_small, s_small), (n_cli, cli_s) = cli.values()
    base = rows["single, 16 connections"]
    print(f"model: {settings['source']}; {len(patients)} held-out patients; each load from an asyncio client in "
          f"a process of its own (raw HTTP/1.1 keep-alive; it shares the server's 2 cores); {secs:g} s per row")
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; after "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{'load':<40}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}{'pred/min':>10}"
          f"{'p99 ratio':>10}{'thr ratio':>10}{'loadavg':>8}")
    for name, r in rows.items():
        per_min = r["predictions_per_min"] * (100 if name.startswith("batches") else 1)
        print(f"{name:<40}{r['requests']:>9}{r['errors']:>7}{r['p50_ms']:>9}{r['p99_ms']:>9}{per_min:>10,}"
              f"{r['p99_ms'] / base['p99_ms']:>10.2f}{r['requests_per_s'] / base['requests_per_s']:>10.2f}"
              f"{r['loadavg_1min']:>8}")
    for n in (1, 16, 64):
        plain = rows[f"single, {n} connection{'s' if n > 1 else ''}"]
        loaded = rows[f"single + 300-patient explanations, {n}"]
        print(f"explanations raise prediction p99 at {n} connection{'s' if n > 1 else ''}: "
              f"{loaded['p99_ms'] / plain['p99_ms']:.2f}x (p50 {loaded['p50_ms'] / plain['p50_ms']:.2f}x, "
              f"throughput {loaded['requests_per_s'] / plain['requests_per_s']:.2f}x)")
    runs16 = [base] + [plain for plain, _ in pairs]  # every 16-connection row without explanations
    p99_16 = float(np.median([r["p99_ms"] for r in runs16]))
    per_min_16 = float(np.median([r["predictions_per_min"] for r in runs16]))
    raised = [loaded["p99_ms"] / plain["p99_ms"] for plain, loaded in pairs]
    raised_16 = float(np.median(raised)) if raised else explained_ratio(rows)
    if pairs:
        print(f"\n{len(pairs)} back-to-back pairs at 16 connections (without, then with explanations; {secs:g} s each):")
        for k, (plain, loaded) in enumerate(pairs):
            print(f"  pair {k}: p99 {plain['p99_ms']} -> {loaded['p99_ms']} ms ({raised[k]:.2f}x), "
                  f"{plain['predictions_per_min']:,} -> {loaded['predictions_per_min']:,} per min, "
                  f"load average {plain['loadavg_1min']}")
    print(f"16 connections, median of {len(runs16)} rows without explanations: p99 {p99_16:.1f} ms, "
          f"{per_min_16:,.0f} predictions/min; the explanation load raises p99 {raised_16:.2f}x (median"
          f"{' of the pairs' if pairs else ', the table'})")
    c = {"patients": n_cli, "seconds": round(cli_s, 2), "patients_per_s": round(n_cli / cli_s, 1),
         "small_patients": n_small, "small_seconds": round(s_small, 2)}
    print(f"\ncli: {c['patients']} patients in {c['seconds']} s = {c['patients_per_s']:,} patients/s including process "
          f"start and loading ({c['small_patients']} patients: {c['small_seconds']} s)")
    answered = list(rows.values()) + [row for pair in pairs for row in pair]
    targets = {"no_request_refused": all(r["errors"] == 0 for r in answered),
               "p99_16_at_most_30ms": p99_16 <= 30, "40k_predictions_per_min": per_min_16 >= 40000,
               "explanations_raise_p99_at_most_20pct": raised_16 <= 1.2, "cli_1000_per_s": c["patients_per_s"] >= 1000}
    print(f"\ntargets (quiet machine; 16-connection figures are the medians above): {targets}")
    print(json.dumps({"benchmark": "serve", "model": settings["source"], "rows": rows, "pairs": pairs, "cli": c,
                      "medians_16": {"p99_ms": p99_16, "predictions_per_min": per_min_16, "explanations_raise_p99": raised_16},
                      "targets": targets, "loadavg_before": load_before}))


def explained_ratio(rows: dict) -> float:
    return rows["single + 300-patient explanations, 16"]["p99_ms"] / rows["single, 16 connections"]["p99_ms"]


if __name__ == "__main__":
    main()
