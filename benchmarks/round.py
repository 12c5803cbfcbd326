"""One federated round of the 8 center8 hospitals, broken down; SecAgg+ on/off and DP on/off.

Every configuration is a real `flwr run` in Flower's simulation engine (SuperLink, SuperNodes as
Ray actors, the project's ServerApp and ClientApp, Opacus, SecAgg+), of 2 rounds; round 2 is
measured (round 1 also pays process start, data validation and loading). The four runs happen in
this one invocation, one after the other, so their ratios compare like with like.

Where the time goes, from the server's per-round `timing` (metrics.jsonl) and each site's own
`train_seconds`:
    local training   the sites' DP-SGD / SGD steps; sum over sites, and that sum divided by the
                     number of sites training at once here (2 cores: 2) as its wall-clock share
    site other       the rest of a site's round: model set-up, Opacus, privacy ledger and
                     accountant, local evaluation (same wall-clock share)
    SecAgg+          the protocol's setup, share-keys and unmask stages (key agreement, Shamir
                     shares, unmasking), plus its masking inside collect-masked-vectors, estimated
                     as that stage's time minus the same round's fit time without SecAgg+
    aggregation      the strategy's aggregate_fit (inside the unmask stage under SecAgg+)
    messaging        the rest of the fit phase: messages, Ray scheduling, (de)serialisation
    evaluation       federated evaluation of the new global model at every site
The target: SecAgg+ adds at most 50% to the round (fit + evaluate) time.

    python benchmarks/round.py            # the 8 pan-cancer hospitals (vendored cohort)
    python benchmarks/round.py --quick    # 3 small synthetic sites, DP + SecAgg+ only (the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server.run_files import METRICS, metrics_lines  # noqa: E402

from simulations.federation import ensure_partition, run_federation  # noqa: E402

CONFIGS = [("plain", False, False), ("secagg", True, False), ("dp", False, True), ("dp+secagg", True, True)]


def sites_for(work: Path, quick: bool) -> tuple[Path, Path, int]:
    """(site root, schema, number of sites)."""
    if quick:
        from simulations.synthetic import SyntheticConfig, generate_federation

        root = work / "sites"
        generate_federation(root, SyntheticConfig(sites=3, classes=3, patients_per_site=60, omics_widths=[200],
                                                  tabular_columns=4, alpha=5.0, seed=1))
        return root, root / "schema.json", 3
    from simulations.federation import PANCAN_SCHEMA

    root = ensure_partition(work / "sites")
    return root, PANCAN_SCHEMA, len(json.loads((root / "manifest.json").read_text())["sites"])


def measure(work: Path, name: str, secagg: bool, dp: bool, sites: Path, schema: Path, n_sites: int,
            extra: dict) -> dict:
    run = work / name
    cfg = {"base-dir": str(ROOT), "schema": str(schema), "data-root": str(sites), "site-state-root": str(run / "state"),
           "output-dir": str(run / "server"), "num-rounds": 2, "sites": n_sites, "min-sites": 2,
           "round-timeout": 900.0, "secagg": secagg, "dp": dp, "epsilon": 8.0, "seed": 0, **extra}
    t0 = time.perf_counter()
    run_federation(run / "flower", cfg, n_sites=n_sites, stream=None)
    total = time.perf_counter() - t0
    line = metrics_lines(run / "server" / METRICS)[-1]
    t = line["timing"]
    train = [float(s["train_seconds"]) for s in line["sites"].values() if "train_seconds" in s]
    site = [float(s["round_seconds"]) for s in line["sites"].values() if "round_seconds" in s]
    parallel = min(n_sites, os.cpu_count() or 1)
    r = {"config": name, "secagg": secagg, "dp": dp, "sites": len(train), "run_seconds": round(total, 1),
         "fit": t["fit"], "evaluate": t.get("site_evaluate", 0.0), "round": round(t["fit"] + t.get("site_evaluate", 0.0), 2),
         "aggregate": t.get("aggregate", 0.0), "train_sum": round(sum(train), 2),
         "train_wall": round(sum(train) / parallel, 2), "site_other_wall": round((sum(site) - sum(train)) / parallel, 2),
         "parallel_sites": parallel}
    if secagg:
        r["secagg_stages"] = {k.removeprefix("secagg_"): v for k, v in t.items() if k.startswith("secagg_")}
    return r


def breakdown(results: dict) -> list[dict]:
    rows = []
    for name, r in results.items():
        row = {"config": name, "round": r["round"], "training": r["train_wall"], "site_other": r["site_other_wall"],
               "aggregation": r["aggregate"], "evaluation": r["evaluate"]}
        local = r["train_wall"] + r["site_other_wall"]
        if r["secagg"]:
            st = r["secagg_stages"]
            base = results.get("dp" if r["dp"] else "plain")
            masking = max(0.0, st["collect_masked_vectors"] - base["fit"]) if base else 0.0
            row["secagg"] = round(st["setup"] + st["share_keys"] + st["unmask"] - r["aggregate"] + masking, 2)
            row["messaging"] = round(r["fit"] - local - r["aggregate"] - row["secagg"], 2)
        else:
            row["secagg"] = 0.0
            row["messaging"] = round(r["fit"] - local - r["aggregate"], 2)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 small synthetic sites, DP + SecAgg+ only: a smoke run")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="oncofed-round-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sites, schema, n_sites = sites_for(work, args.quick)
        extra = {"batch-size": 16} if args.quick else {"local-epochs": 2}
        configs = [c for c in CONFIGS if c[1] and c[2]] if args.quick else CONFIGS  # quick: a smoke run
        results = {}
        for name, secagg, dp in configs:
            results[name] = measure(work, name, secagg, dp, sites, schema, n_sites, extra)
            print(f"{name:>10}: round {results[name]['round']:.1f} s", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = breakdown(results)
    head = ["config", "round s", "training", "site other", "SecAgg+", "aggregation", "messaging", "evaluation"]
    table = [[r["config"], f"{r['round']:.1f}", f"{r['training']:.1f}", f"{r['site_other']:.1f}", f"{r['secagg']:.1f}",
              f"{r['aggregation']:.3f}", f"{r['messaging']:.1f}", f"{r['evaluation']:.1f}"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    for row in [head] + table:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    ratios = {}
    for dp in (False, True):
        on, off = results.get("dp+secagg" if dp else "secagg"), results.get("dp" if dp else "plain")
        if on and off:
            ratios["secagg_overhead_dp" if dp else "secagg_overhead"] = round(on["round"] / off["round"] - 1, 3)
    if "dp" in results and "plain" in results:
        ratios["dp_round_ratio"] = round(results["dp"]["round"] / results["plain"]["round"], 3)
    for k, v in ratios.items():
        print(f"{k}: {'+' if k.startswith('secagg') else ''}{100 * v if k.startswith('secagg') else v:.1f}"
              f"{'%' if k.startswith('secagg') else 'x'}")
    print(f"{n_sites} sites, round 2 of 2 of each run; {results[next(iter(results))]['parallel_sites']} sites train "
          "at once on this machine; SecAgg+ target: at most +50%")
    print(json.dumps({"benchmark": "round", "quick": args.quick, "sites": n_sites, "results": results,
                      "breakdown": rows, **ratios}))


if __name__ == "__main__":
    main()
