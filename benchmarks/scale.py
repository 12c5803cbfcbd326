"""A simulated federation of 10, 30 and 100 synthetic sites: seconds per round and peak memory.

Every site count is a real `flwr run` in Flower's simulation engine (simulations.federation.
run_federation: a private SuperLink, SuperNodes as Ray actors, the project's ServerApp and
ClientApp, Opacus DP-SGD, SecAgg+ unless --no-secagg), on a synthetic federation generated for it
(simulations.synthetic: ~80 patients per site, omics widths 500 and 100, 6 clinical columns, a
300-patient hold-out site). Sites score the global model only after the last round
(evaluate-every = rounds), so rounds 1..R-1 are fit rounds and round R is fit + site evaluation.

Time, from the server's metrics.jsonl (`seconds` is cumulative from the ServerApp's start, so
round 1 also pays the wait for all sites to connect, Ray's actor start-up, and the sites' first
data validation and loading):
    first round      seconds of round 1
    s/round          mean over rounds 2..R (steady state; over all rounds if R = 1)
    fit              mean `timing.fit` (incl. SecAgg+) over rounds 2..R
    site eval        `timing.site_evaluate` of the last round
    CPU s/round      CPU seconds (user + system) of all the run's processes per round, rounds 2..R:
                     the cost of a round; unlike wall time it hardly depends on other jobs' load
Memory: a background thread samples, every 0.5 s, the resident set (VmRSS) and, where readable,
the proportional set (Pss, shared pages split between the processes that map them) of every
process in the trees rooted at this process and at the SuperLink (started in its own session):
flwr, the SuperLink, flwr-simulation (the ServerApp and the simulation engine), Ray's services
and its workers (one ClientApp actor per core here, whatever the number of sites). Summed RSS
counts shared library pages once per process; summed PSS does not. A second table gives the peak
RSS of each kind of process, to show which part grows with the number of sites.

    python benchmarks/scale.py                        # 10, 30, 100 sites x 5 rounds, DP + SecAgg+
    python benchmarks/scale.py --no-secagg            # the same without SecAgg+
    python benchmarks/scale.py --quick                # 3 sites x 2 rounds (the test suite)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server.run_files import FINAL_WEIGHTS, METRICS, RESULT, metrics_lines  # noqa: E402

from server.processes import end_sessions, process_table, process_tree, session_processes  # noqa: E402
from simulations import federation  # noqa: E402
from simulations.federation import SimulationError, run_federation  # noqa: E402

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- memory: every process in the trees rooted at this process and the SuperLink -----------------

def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE_KB
    except (OSError, ValueError, IndexError):
        return None


def _pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _name(pid: int) -> str:
    """What the process is: a Ray worker (idle, or hosting ClientApps), a Ray service, or the
    program's name (flwr-simulation, flower-superlink, ...)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith(("ray::ClientAppActor", "ray::IDLE")) or any(a.endswith("default_worker.py") for a in argv):
        return "Ray workers (ClientApps)"  # a worker renames itself once it hosts the actor
    if argv[0].startswith("ray::") or any("/site-packages/ray/" in a for a in argv):
        return "Ray services"
    if Path(argv[0]).name.startswith("python"):  # python [-u] .../flwr-simulation ...
        if "-c" in argv[1:] or "-m" in argv[1:]:
            return f"{Path(argv[0]).name} {next(a for a in argv[1:] if a in ('-c', '-m'))}"
        argv = [a for a in argv[1:] if not a.startswith("-")] or argv
    return Path(argv[0]).name[:40]


class TreeSampler(threading.Thread):
    """Every `interval` s: summed RSS / PSS and the largest single process of the trees rooted at
    `roots` (a list the caller may append to while sampling, e.g. the SuperLink once started), and
    their CPU time (user + system, summed over every process ever seen, at its last sample). The
    CPU time is also noted each time `metrics` (the server's metrics.jsonl) gains a round line, so
    each round's CPU seconds are known: on a shared machine they vary less than wall time does.
    Flower starts the SuperLink and its SuperExec each in a new session; processes of every session
    seen in the trees stay sampled if their parent ends first (they are re-parented to init), and
    `reap` ends those still alive after the run."""

    def __init__(self, roots: list[int], metrics: Path, interval: float = 0.5):
        super().__init__(daemon=True)
        self.roots, self.metrics, self.interval = roots, metrics, interval
        self.stop_event = threading.Event()
        self.samples = 0
        self.peak_rss_kb = self.peak_pss_kb = self.peak_single_kb = 0
        self.peak_single_name = ""
        self.peak_processes = 0
        self.peak_by_name: dict[str, int] = {}  # kB, summed over the processes of that name
        self.pss_readable = True
        self.cpu: dict[int, float] = {}  # CPU seconds of each process, at its last sample
        self.round_cpu: list[float] = []  # cumulative CPU seconds at the end of each round
        self.own_session = os.getsid(0)
        self.sessions: set[int] = set()  # sessions started by the run (SuperLink, SuperExec)

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def sample(self) -> None:
        stats = process_table()
        pids = process_tree(list(self.roots) + [p for p, st in stats.items() if st[2] in self.sessions], stats)
        total = pss_total = 0
        by_name: dict[str, int] = {}
        for pid in pids:
            self.cpu[pid] = stats[pid][1]
            if stats[pid][2] != self.own_session:
                self.sessions.add(stats[pid][2])
            rss = _rss_kb(pid)
            if rss is None:
                continue
            total += rss
            name = _name(pid)
            if name != "?":  # "?": it ended between the two reads
                by_name[name] = by_name.get(name, 0) + rss
            if rss > self.peak_single_kb:
                self.peak_single_kb, self.peak_single_name = rss, name
            if self.pss_readable:
                pss = _pss_kb(pid)
                if pss is None and pid == os.getpid():
                    self.pss_readable = False
                pss_total += pss if pss is not None else rss
        self.samples += 1
        self.peak_processes = max(self.peak_processes, len(pids))
        self.peak_rss_kb = max(self.peak_rss_kb, total)
        self.peak_pss_kb = max(self.peak_pss_kb, pss_total)
        for name, kb in by_name.items():
            self.peak_by_name[name] = max(self.peak_by_name.get(name, 0), kb)
        try:
            rounds = self.metrics.read_bytes().count(b"\n")
        except OSError:
            rounds = 0
        while len(self.round_cpu) < rounds:
            self.round_cpu.append(self.cpu_seconds())

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def reap(self, grace: float = 15.0) -> int:
        """End the processes of the run's sessions still alive `grace` s after it (an interrupted or
        failed run could leave flwr-simulation and Ray behind; LocalSuperLink.stop now ends them, this
        is the benchmark's own check that nothing outlives a measured run). Returns how many had to be ended."""
        deadline = time.monotonic() + grace
        while session_processes(self.sessions) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = session_processes(self.sessions)
        end_sessions(self.sessions)
        return len(left)

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        out = {"peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
               "peak_single_rss_mb": round(self.peak_single_kb / 1024, 1),
               "peak_single_process": self.peak_single_name, "peak_processes": self.peak_processes,
               "memory_samples": self.samples, "cpu_seconds": round(self.cpu_seconds(), 1),
               "peak_rss_mb_by_process": {k: round(v / 1024, 1) for k, v in
                                          sorted(self.peak_by_name.items(), key=lambda kv: -kv[1])}}
        if self.pss_readable:
            out["peak_pss_mb"] = round(self.peak_pss_kb / 1024, 1)
        cum = self.round_cpu
        out["per_round_cpu_seconds"] = [round(b - a, 1) for a, b in zip([0.0] + cum, cum)]
        return out


# --- one federation -------------------------------------------------------------------------------

def make_sites(work: Path, n: int, patients: int, seed: int) -> Path:
    from simulations.synthetic import SyntheticConfig, generate_federation

    root = work / f"sites-{n}"
    if not (root / "manifest.json").exists():
        generate_federation(root, SyntheticConfig(sites=n, classes=4, patients_per_site=patients,
                                                  omics_widths=[500, 100], tabular_columns=6, alpha=5.0,
                                                  holdout_patients=300, seed=seed), overwrite=True)
    return root


def measure(work: Path, n: int, args: argparse.Namespace) -> dict:
    sites = make_sites(work, n, args.patients_per_site, args.seed)
    run = work / f"run-{n}{'' if args.secagg else '-nosecagg'}"
    shutil.rmtree(run, ignore_errors=True)
    evaluate_every = args.evaluate_every or args.rounds
    cfg = {"base-dir": str(ROOT), "schema": str(sites / "schema.json"), "data-root": str(sites),
           "site-state-root": str(run / "state"), "output-dir": str(run / "server"), "eval-data": "",
           "num-rounds": args.rounds, "sites": n, "min-sites": max(2, math.ceil(0.8 * n)),
           "evaluate-every": evaluate_every, "round-timeout": args.round_timeout, "secagg": args.secagg, "dp": True,
           "epsilon": 8.0, "local-epochs": args.local_epochs, "batch-size": args.batch_size, "seed": args.seed}
    (run / "flower").mkdir(parents=True, exist_ok=True)

    roots = [os.getpid()]
    sampler = TreeSampler(roots, run / "server" / METRICS, interval=0.5)
    start_link = federation.start_local_superlink

    def start_and_watch(w: Path):  # the SuperLink runs in its own session: sample its tree as well
        link = start_link(w)
        roots.append(link.process.pid)
        return link

    load = os.getloadavg()[0]
    federation.start_local_superlink = start_and_watch
    sampler.start()
    t0 = time.perf_counter()
    error = None
    try:
        run_federation(run / "flower", cfg, n_sites=n, stream=sys.stderr if args.verbose else None)
    except SimulationError as e:
        error = str(e)
    finally:
        wall = time.perf_counter() - t0
        federation.start_local_superlink = start_link
        mem = sampler.stop()
        leftover = sampler.reap()
        if leftover:
            print(f"{n} sites: ended {leftover} processes the run left behind", file=sys.stderr)
    r = {"sites": n, "secagg": args.secagg, "dp": True, "rounds": args.rounds, "evaluate_every": evaluate_every,
         "min_sites": cfg["min-sites"], "run_seconds": round(wall, 1), "load_before": round(load, 2), **mem,
         "cores_busy": round(mem["cpu_seconds"] / wall, 2), "leftover_processes": leftover, "work": str(run)}
    metrics = run / "server" / METRICS
    lines = metrics_lines(metrics)
    if error is not None:
        r["error"] = error
    if len(lines) < args.rounds:
        r.setdefault("error", f"only {len(lines)} of {args.rounds} rounds in {metrics}")
    if not lines:
        return r
    cum = [float(x["seconds"]) for x in lines]
    per_round = [round(b - a, 2) for a, b in zip([0.0] + cum, cum)]
    steady = per_round[1:] or per_round
    fits = [float(x["timing"].get("fit", 0.0)) for x in lines]
    fit_steady = fits[1:] or fits
    cpu = r.pop("per_round_cpu_seconds")
    if len(cpu) == len(per_round):
        steady_cpu = cpu[1:] or cpu
        r.update(per_round_cpu_seconds=cpu, first_round_cpu_seconds=cpu[0],
                 cpu_seconds_per_round=round(sum(steady_cpu) / len(steady_cpu), 1))
    r.update(
        per_round_seconds=per_round, first_round_seconds=per_round[0],
        seconds_per_round=round(sum(steady) / len(steady), 2),
        seconds_per_round_all=round(sum(per_round) / len(per_round), 2),
        fit_seconds=round(sum(fit_steady) / len(fit_steady), 2),
        site_evaluate_seconds=float(lines[-1]["timing"].get("site_evaluate", 0.0)),
        participants=[len(x.get("participants", [])) for x in lines],
        failures=sum(len(x.get("failures", [])) for x in lines),
        refused=sum(len(x.get("refused", [])) for x in lines),
        dropped=sum(len(x.get("dropped", [])) for x in lines))
    if args.secagg:
        stages = [{k.removeprefix("secagg_"): v for k, v in x["timing"].items() if k.startswith("secagg_")}
                  for x in lines[1:] or lines]
        r["secagg_stages"] = {k: round(sum(s.get(k, 0.0) for s in stages) / len(stages), 2) for k in stages[0]}
    weights = run / "server" / FINAL_WEIGHTS
    if weights.exists():
        import numpy as np

        with np.load(weights) as z:
            r["model_parameters"] = int(sum(z[k].size for k in z.files))
        r["model_mb"] = round(r["model_parameters"] * 4 / 2**20, 2)  # float32
    result = run / "server" / RESULT
    if result.exists():
        deliveries = json.loads(result.read_text()).get("deliveries", [])
        r["delivered"] = sum(bool(d.get("installed")) for d in deliveries)
    return r


def _interrupt(signum, frame) -> None:
    """SIGTERM as Ctrl-C: unwind, so that the SuperLink is stopped and the run's processes reaped."""
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="10,30,100", help="comma-separated site counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-secagg", dest="secagg", action="store_false", help="plain FedAvg messages (DP stays on)")
    ap.add_argument("--quick", action="store_true", help="3 sites x 2 rounds: a smoke run")
    ap.add_argument("--evaluate-every", type=int, default=0, help="default: the number of rounds (last round only)")
    ap.add_argument("--patients-per-site", type=int, default=80)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="expected DP batch (Poisson sampling)")
    ap.add_argument("--round-timeout", type=float, default=1800.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep sites and runs here (default: a temporary "
                    "directory, removed unless a run failed)")
    ap.add_argument("--verbose", action="store_true", help="stream the run's round/warning lines to stderr")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    if args.quick:
        args.sites, args.rounds = "3", 2
    counts = [int(s) for s in args.sites.split(",") if s.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="oncofed-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    for n in counts:
        r = results[str(n)] = measure(work, n, args)
        status = f"error: {r['error']}" if "error" in r else (
            f"{r['seconds_per_round']:.1f} s/round, peak {r['peak_rss_mb']:.0f} MB")
        print(f"{n:>4} sites: {r['run_seconds']:.0f} s, {status}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    failed = any("error" in r for r in results.values())
    if args.work is None and not failed:
        shutil.rmtree(work, ignore_errors=True)
    elif failed:
        print(f"logs kept in {work} (flower/flwr-run.log, flower/.flwr/local-superlink/superlink.log)",
              file=sys.stderr)

    head = ["sites", "first round s", "s/round", "fit s", "site eval s", "CPU s/round", "run s", "peak RSS MB",
            "peak PSS MB", "largest proc MB", "procs"]
    table = []
    for r in results.values():
        if "seconds_per_round" not in r or "error" in r:  # a run that failed after some rounds measured no steady state
            table.append([r["sites"], "failed"] + ["-"] * (len(head) - 2))
            continue
        table.append([r["sites"], f"{r['first_round_seconds']:.1f}", f"{r['seconds_per_round']:.1f}",
                      f"{r['fit_seconds']:.1f}", f"{r['site_evaluate_seconds']:.1f}",
                      f"{r['cpu_seconds_per_round']:.1f}" if "cpu_seconds_per_round" in r else "-",
                      f"{r['run_seconds']:.0f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r.get('peak_pss_mb', 0):.0f}" if "peak_pss_mb" in r else "-",
                      f"{r['peak_single_rss_mb']:.0f}", r["peak_processes"]])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    for row in [head] + table:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    ok = [r for r in results.values() if "seconds_per_round" in r and "error" not in r]
    if ok:  # where the memory is: peak RSS of each kind of process (summed over processes of that name)
        names = list(dict.fromkeys(k for r in ok for k, v in r["peak_rss_mb_by_process"].items() if v > 0))
        head2 = ["peak RSS MB by process"] + [f"{r['sites']} sites" for r in ok]
        rows2 = [[k] + [f"{r['peak_rss_mb_by_process'].get(k, 0):.0f}" for r in ok] for k in names]
        w2 = [max(len(str(c)) for c in col) for col in zip(head2, *rows2)]
        print("\npeak RSS of each kind of process, summed over its processes (peaks need not coincide)")
        for row in [head2] + rows2:
            print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, w2))))
        print()
    model = next((r for r in ok if "model_parameters" in r), None)
    growth = {}
    if len(ok) >= 2:
        lo, hi = ok[0], ok[-1]
        growth = {"sites_ratio": round(hi["sites"] / lo["sites"], 2),
                  "peak_rss_ratio": round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 2),
                  "peak_rss_mb_per_extra_site": round((hi["peak_rss_mb"] - lo["peak_rss_mb"])
                                                      / max(hi["sites"] - lo["sites"], 1), 2)}
    print(f"DP on, SecAgg+ {'on' if args.secagg else 'off'}; {args.rounds} rounds, sites evaluate after round "
          f"{args.evaluate_every or args.rounds} and the last; s/round = mean of rounds 2..{args.rounds}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} now"
          + (f"; model {model['model_parameters']:,} parameters ({model['model_mb']} MB float32)" if model else "")
          + (f"; peak RSS x{growth['peak_rss_ratio']} for x{growth['sites_ratio']} sites" if growth else ""))
    print(json.dumps({"benchmark": "scale", "quick": args.quick, "secagg": args.secagg, "dp": True,
                      "rounds": args.rounds, "cores": os.cpu_count(), "total_seconds": round(total, 1),
                      "results": results, **({"memory_growth": growth} if growth else {})}))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
