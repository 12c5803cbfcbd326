"""The files of a run's output directory (`output-dir`), named once: the ServerApp writes them; `oncofed deliver`,
`oncofed runs`, the metrics exporter, the simulations and the benchmarks read them (metrics.jsonl with
`metrics_lines`, its one reader)."""

import json
from pathlib import Path

RUN_FILE = "run.json"               # the run's key and its frozen run config (server/checkpoint.py)
STATUS = "status.json"              # the run's state, rewritten every round (read by server/metrics.py)
PROGRESS = "progress.json"          # the round's message exchanges as they happen (server/progress.py)
METRICS = "metrics.jsonl"           # one line per round
CHECKPOINTS = "checkpoints"         # the directory of per-round checkpoints
RESULT = "result.json"              # the finished run: final model's hash, deliveries
WRITTEN_BY = "flwr_run"             # result.json's key: the flwr run whose ServerApp last wrote it (its own, a deliver)
PACKAGE = "package.json"            # the final model's description, signed at delivery
FINAL_WEIGHTS = "final_weights.npz"
FLWR_RUNS = "flwr-runs.json"        # the Flower run ids `oncofed run` submitted for this run directory
DELIVERY_RUNS = "delivery-runs.json"  # the Flower runs `oncofed deliver` submitted, and how each ended early (runs.py)
FLWR_LOG = "flwr-run.log"           # what `flwr run` printed


def metrics_lines(path: Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl's rounds, this attempt's and any before a resume: every reader's. A last line that does
    not read is skipped: a crash cut it short mid-write (a resume cuts it, server.app.recover_round_records), or it is
    being appended now. A line before it that does not read raises (json.JSONDecodeError, a ValueError)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    records = [json.loads(ln) for ln in lines[:-1]]
    try:
        records += [json.loads(ln) for ln in lines[-1:]]
    except ValueError:
        pass
    return records
