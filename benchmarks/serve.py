"""Load on the site prediction service: a real `oncofed serve` process on loopback, real patients.

The model is the pan-cancer architecture (schema of the vendored cohort, default ModelConfig): the
active model of `--site-state` (e.g. runs/main/state/C0 after the README's main job) or, without
it, freshly initialised weights (latency does not depend on weight values). Patients are the
vendored cohort's held-out patients, normalised with the statistics of hospital C0.

Measured in this one invocation, against the same server process:
    single   16 concurrent clients, one patient per request, no explanations: p50 / p99 latency,
             predictions per minute (target: p99 < 50 ms, >= 20,000 / min)
    explain  the same with top-5 integrated-gradient features
    batch    4 concurrent clients, 100 patients per request: patients per second
    cli      `oncofed predict` over the whole held-out directory: patients per second (target >= 1,000)
Ends with one JSON line.

    python benchmarks/serve.py [--seconds 10] [--site-state DIR]
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
    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import RunConfig
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
        cfg = RunConfig.from_flower({"schema": "x"}).model_config_()
        model = MultiModalTransformer(schema, cfg)
        ModelStore(model_dir).install(schema, cfg, state_arrays(model), {"run": "benchmark", "round": 0})
        tables = read_site(schema, data / "C0")
        Normalizer.fit(schema, raw_matrix(schema, tables)).save(state / "normalizer.json")
        source = f"initial weights ({model.num_parameters():,} parameters)"
    settings = {"model-dir": str(model_dir), "state-dir": str(state), "source": source}
    (work / "site.json").write_text(json.dumps(settings))
    token = TokenStore(state / TOKENS_FILE).add("bench", "clinician")
    settings["token"] = token
    # JSON patients from the held-out directory
    pred = Predictor(model_dir, state / "normalizer.json")
    ids, raw = pred.raw_from_tables(data / "holdout")
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


def load(port: int, token: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = [0]
    stop = time.time() + seconds
    lock = threading.Lock()

    def worker(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        i, mine = k, []
        while time.time() < stop:
            body = bodies[i % len(bodies)]
            t = time.perf_counter()
            conn.request("POST", "/v1/predict", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            mine.append(time.perf_counter() - t)
            if r.status != 200:
                errors[0] += 1
            i += clients
        with lock:
            lat.extend(mine)

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    a = np.array(lat) * 1000
    return {"requests": len(a), "errors": errors[0], "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "requests_per_s": round(len(a) / wall, 1)}


def wrk_load(port: int, token: str, body: bytes, clients: int, seconds: float, work: Path) -> dict | None:
    """The same single-patient load from wrk (C, 2 threads): the client costs far less CPU than Python's."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return None
    (work / "body.json").write_bytes(body)
    script = work / "post.lua"
    script.write_text(f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
local f = io.open("{work / 'body.json'}", "rb"); wrk.body = f:read("*a"); f:close()
""")
    out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/predict"], capture_output=True, text=True).stdout

    def ms(label):
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        return round(float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1000}[m.group(2)], 2) if m else None

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    reqs = re.search(r"(\d+) requests in", out)
    return {"requests": int(reqs.group(1)) if reqs else 0, "errors": int(non2xx.group(1)) if non2xx else 0,
            "p50_ms": ms("50"), "p99_ms": ms("99"), "requests_per_s": float(rps.group(1)) if rps else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--site-state", type=Path, default=None, help="a site's state root with models/ and state/")
    args = ap.parse_args()
    from simulations.federation import free_port

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings, holdout, patients = prepare(work, args.site_state)
        port = free_port()
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        server = subprocess.Popen([sys.executable, "-m", "oncofed", "serve", "--site-config", str(work / "site.json"),
                                   "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(300):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                    c.request("GET", "/health")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            single = [json.dumps({"patients": [p], "top_k": 0}).encode() for p in patients]
            explain = [json.dumps({"patients": [p], "top_k": 5}).encode() for p in patients]
            batches = [json.dumps({"patients": patients[i:i + 100], "top_k": 0}).encode()
                       for i in range(0, len(patients) - 99, 100)]
            load(port, settings["token"], single[:50], 4, 1.0)  # warm-up
            res = {"single": wrk_load(port, settings["token"], single[0], 16, args.seconds, work)
                   or load(port, settings["token"], single, 16, args.seconds),
                   "single_python_clients": load(port, settings["token"], single, 16, args.seconds),
                   "explain": load(port, settings["token"], explain, 16, args.seconds / 2),
                   "batch": load(port, settings["token"], batches, 4, args.seconds / 2)}
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
    for k in ("single", "single_python_clients"):
        res[k]["predictions_per_min"] = round(res[k]["requests_per_s"] * 60)
    res["batch"]["patients_per_s"] = round(res["batch"]["requests_per_s"] * 100)
    res["cli"] = {"patients": n_cli, "seconds": round(cli_s, 2), "patients_per_s": round(n_cli / cli_s, 1),
                  "small_patients": n_small, "small_seconds": round(s_small, 2),
                  "marginal_patients_per_s": round((n_cli - n_small) / max(cli_s - s_small, 1e-9), 1)}
    print(f"model: {settings['source']}; {len(patients)} held-out patients; 16 concurrent clients\n")
    print("single: wrk (2 threads, 16 connections) when installed; single_python_clients: 16 Python threads on the "
          "same 2 cores (their own CPU use slows the server)")
    print(f"{'load':<10}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}  notes")
    for k in ("single", "single_python_clients", "explain", "batch"):
        r = res[k]
        note = (f"{r['predictions_per_min']:,} predictions/min" if k.startswith("single") else
                f"{r['patients_per_s']:,} patients/s" if k == "batch" else "top-5 integrated gradients")
        print(f"{k[:10]:<10}{r['requests']:>10}{r['p50_ms']:>10}{r['p99_ms']:>10}{r['requests_per_s']:>10}  {note}")
    c = res["cli"]
    print(f"{'cli':<10}{c['patients']:>10}{'':>10}{'':>10}{'':>10}  {c['patients_per_s']:,} patients/s "
          f"({c['seconds']} s incl. process start and loading; {c['small_patients']} patients: "
          f"{c['small_seconds']} s; marginal {c['marginal_patients_per_s']:,} patients/s)")
    targets = {"p99_under_50ms": res["single"]["p99_ms"] < 50,
               "20k_predictions_per_min": res["single"]["predictions_per_min"] >= 20000,
               "cli_1000_per_s": c["patients_per_s"] >= 1000}
    print(f"\ntargets: {targets}")
    print(json.dumps({"benchmark": "serve", "model": settings["source"], **res, "targets": targets}))


if __name__ == "__main__":
    main()
