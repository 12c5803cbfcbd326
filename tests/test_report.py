"""`oncofed report`: a report from a results directory that follows the runner's contract, and the fairness metrics."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from simulations.cli_report import register
from simulations.report import build_report, demographic_parity_gap, equalized_odds_gap, subgroup_table

PNG = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["experiment", "cell", "data", "partition", "sites", "strategy", "privacy", "epsilon_target", "seed",
           "method", "round", "site", "patients", "accuracy", "balanced_accuracy", "macro_f1", "epsilon_spent",
           "seconds"]


def _predictions(rng: np.random.Generator, classes: list[str], quality: float, sites: list[str], n_held: int,
                 n_site: int, demographics: bool, modalities: list[str]) -> dict[str, np.ndarray]:
    """Fake predictions.npz arrays: logits and fused vectors pulled towards the true class by `quality`."""
    k, n = len(classes), n_held + n_site * len(sites)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + quality * np.eye(k)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    centres = rng.normal(0, 3, (k, 16))
    present = rng.random((n, len(modalities))) > 0.15
    present[:, 0] = True
    weights = rng.random((n, len(modalities))) * present
    held = np.arange(n) < n_held
    if demographics:  # ages drawn so that "<40" is a small (< 10 patients) group
        age = rng.choice([35.0, 45.0, 55.0, 65.0, 75.0, np.nan], n, p=[0.04, 0.2, 0.3, 0.26, 0.15, 0.05])
        gender = rng.choice(["FEMALE", "MALE", ""], n, p=[0.5, 0.45, 0.05])
    else:
        age, gender = np.full(n, np.nan), np.full(n, "")
    return {"classes": np.array(classes), "modalities": np.array(modalities), "y": y.astype(np.int64),
            "proba": proba.astype(np.float32), "fused": (centres[y] + rng.normal(0, 2, (n, 16))).astype(np.float32),
            "modality_weights": (weights / weights.sum(1, keepdims=True)).astype(np.float32), "present": present,
            "split": np.where(held, "held-out", "site"),
            "site": np.where(held, rng.choice(["A7", "BH", "E2"], n),
                             np.repeat(["", *sites], [n_held] + [n_site] * len(sites))),
            "age": age, "gender": gender}


def make_results(root: Path, datasets: tuple = (("mini4", 4, True), ("mini3", 3, False)),
                 strategies: tuple = ("fedavg", "fedprox"), privacies: tuple = ("off", "8"), seeds: tuple = (0,),
                 rounds: int = 3, n_sites: int = 3, n_held: int = 120, n_site: int = 10) -> Path:
    """A results directory exactly as the contract describes (rows, cell.json, final.json, predictions.npz)."""
    rng = np.random.default_rng(0)
    modalities = ["mutation", "cnv", "clinical"]
    sites = [f"C{i}" for i in range(n_sites)]
    rows: list[dict] = []

    def cell(cid: str, data: str, method: str, strategy, privacy: str, seed: int, quality: float | None,
             classes: list[str], demographics: bool) -> None:
        d = root / "cells" / cid
        d.mkdir(parents=True)
        meta = {"cell": cid, "data": data, "partition": "dirichlet", "sites": n_sites, "strategy": strategy,
                "privacy": privacy, "seed": seed, "method": method}
        (d / "cell.json").write_text(json.dumps(meta))
        if quality is None:
            return
        f1 = min(0.95, 0.25 + 0.2 * quality)
        (d / "final.json").write_text(json.dumps({
            "held_out": {"patients": n_held, "accuracy": f1 + 0.05, "balanced_accuracy": f1 + 0.02, "macro_f1": f1},
            "modality_weight_mean": {m: w for m, w in zip(modalities, (0.5, 0.3, 0.2))},
            "modality_ablation": {m: f1 - drop for m, drop in zip(modalities, (0.2, 0.05, -0.01))},
            "modality_patterns": {modalities[0]: {"patients": 40, "accuracy": 0.9},
                                  f"{modalities[1]}+{modalities[2]}": {"patients": 35, "accuracy": 0.2}}}))
        np.savez(d / "predictions.npz", **_predictions(rng, classes, quality, sites, n_held, n_site, demographics,
                                                       modalities))

    def row(cid: str, data: str, method: str, strategy, privacy: str, seed: int, rnd, site: str, f1: float,
            spent=None) -> None:
        rows.append({"experiment": "fake", "cell": cid, "data": data, "partition": "dirichlet", "sites": n_sites,
                     "strategy": strategy, "privacy": privacy,
                     "epsilon_target": None if privacy == "off" else float(privacy),
                     "seed": seed, "method": method, "round": rnd, "site": site, "patients": n_held,
                     "accuracy": min(1.0, f1 + 0.05), "balanced_accuracy": f1 + 0.02, "macro_f1": f1,
                     "epsilon_spent": spent, "seconds": 1.0})

    for data, k, demographics in datasets:
        classes = [f"{data.upper()}_{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefgh"[:k]]
        for seed in seeds:
            for s, strategy in enumerate(strategies):
                for privacy in privacies:
                    dp = privacy != "off"
                    cid = f"{data}-{strategy}-{privacy}-s{seed}"
                    quality = 2.5 + 0.4 * s - (1.5 / math.sqrt(float(privacy)) if dp else 0) + 0.1 * seed
                    cell(cid, data, "federated", strategy, privacy, seed, quality, classes, demographics)
                    for r in range(1, rounds + 1):
                        f1 = min(0.95, 0.25 + 0.2 * quality) * (0.6 + 0.4 * r / rounds)
                        spent = float(privacy) * r / rounds if dp else None
                        row(cid, data, "federated", strategy, privacy, seed, r, "held-out", f1)
                        row(cid, data, "federated", strategy, privacy, seed, r, "global", f1 + 0.03)
                        for i, site in enumerate(sites):
                            if site == "C1" and r == rounds:  # C1 trained in the last round but was not evaluated
                                rows.append({**rows[-1], "site": "C1", "patients": None, "accuracy": None,
                                             "balanced_accuracy": None, "macro_f1": None, "epsilon_spent": spent})
                            else:
                                f1_site = min(1.0, f1 + 0.04 * (i - 1))
                                row(cid, data, "federated", strategy, privacy, seed, r, site, f1_site, spent)
            for method, quality in (("pooled", 3.5), ("logistic", 3.2), ("pooled-cv", None), ("local", None),
                                    ("local-logistic", None)):
                cid = f"{data}-{method}-s{seed}"
                cell(cid, data, method, None, "off", seed, quality if method == "pooled" else None, classes,
                     demographics)
                if method in ("pooled", "logistic"):
                    row(cid, data, method, None, "off", seed, None, "held-out", min(0.95, 0.25 + 0.2 * quality))
                elif method == "pooled-cv":
                    for site in ("fold-0", "fold-1", "fold-2", "mean"):
                        row(cid, data, method, None, "off", seed, None, site, 0.8)
                else:
                    for i, site in enumerate(sites):
                        row(cid, data, method, None, "off", seed, None, site, 0.45 + 0.05 * i)
    (root / "experiment.toml").write_text('name = "fake"\n')
    (root / "results.json").write_text(json.dumps({"experiment": {"name": "fake"}, "rows": rows}))
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / "results.csv", index=False)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = make_results(tmp_path_factory.mktemp("results"))
    return build_report(root)


def test_report_has_every_figure_as_a_png(report):
    md = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    # rounds + privacy-utility + per-site x 2 data sets + 3 featured cells x (roc, confusion, t-SNE, modalities) x 2
    # + subgroups for the 3 featured cells of the data set with age/gender
    assert len(images) == 2 + 2 + 3 * 4 * 2 + 3
    for rel in images:
        path = report.parent / rel
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, rel
    assert sorted(p.name for p in (report.parent / "figures").glob("*.png")) == sorted(Path(r).name for r in images)
    for kind in ("rounds", "privacy_utility", "sites_", "roc_", "confusion_", "tsne_", "modalities_", "subgroups_"):
        assert any(Path(r).name.startswith(kind) for r in images), kind
    html = (report.parent / "report.html").read_text()
    assert html.count("<img ") == len(images) and "<table>" in html


def test_report_has_summary_costs_and_subgroups(report):
    md = report.read_text()
    assert ("| method | configuration | privacy | seeds | evaluated patients | accuracy | balanced acc. | macro-F1 |"
            in md)
    assert "| grouping | group | patients | accuracy | macro-F1 | in gaps |" in md
    # accuracy per modality pattern (final.json's), weakest first
    patterns = md.index("#### Modality patterns (held-out patients, the other modalities masked)")
    table = md[patterns:md.index("#### Subgroups", patterns)]
    assert "| modalities | patients | accuracy |" in table and table.index(" + ") < table.index("0.900")
    assert "**Cost of federation**" in md and "**Cost of privacy, ε=8**" in md
    # The data set without age/gender says why its subgroup plot is missing instead of failing.
    assert "no age or gender" in md
    # the "<40" band is listed (small) but not in the gaps
    assert re.search(r"\| age at diagnosis \| <40 \| \d \| .* \| no \|", md)
    # C1 skipped the last round: the per-site section says so
    assert "C1 (round 2)" in md


def test_cost_sentences_come_from_the_numbers(report):
    md = report.read_text()
    rows = pd.read_csv(report.parent.parent / "results.csv")
    ho = rows[(rows.data == "mini4") & (rows.site == "held-out")]
    fed = ho[(ho.method == "federated") & (ho["round"] == 3)]
    best_nodp = fed[fed.privacy == "off"].macro_f1.max()
    pooled = ho[ho.method == "pooled"].macro_f1.iloc[0]
    assert f"{best_nodp - pooled:+.3f}" in md.split("### mini3")[0]


def test_the_cost_of_privacy_compares_dp_and_no_dp_on_the_same_partition_and_sites():
    """The best no-DP arm over every partition against the best DP arm over every partition printed -0.320 for
    iid 0.90/0.50 and dirichlet 0.60/0.58: the cost of neither (iid -0.400, dirichlet -0.020)."""
    from simulations.report.render import cost_sentences

    arms = pd.DataFrame([
        {"method": "federated", "partition": p, "sites": 3, "privacy": privacy, "line": f"fedavg · {p}",
         "macro_f1_mean": f1}
        for p, privacy, f1 in (("iid", "off", 0.90), ("iid", "8", 0.50), ("dirichlet:0.3", "off", 0.60),
                               ("dirichlet:0.3", "8", 0.58))])
    privacy = [s for s in cost_sentences(arms) if s.startswith("**Cost of privacy")]
    assert len(privacy) == 2 and not any("-0.320" in s for s in privacy), privacy
    assert "(partition iid, 3 sites)" in privacy[0] and "-0.400" in privacy[0]
    assert "(partition dirichlet:0.3, 3 sites)" in privacy[1] and "-0.020" in privacy[1]


class _Page(HTMLParser):
    """The elements of an HTML page that matter here: tags opened, headings (level, text), tables (rows of cells)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.headings: list[tuple[int, str]] = []
        self.tables: list[list[list[str]]] = []
        self._text: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if re.fullmatch(r"h[1-6]|th|td", tag):
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if re.fullmatch(r"h[1-6]", tag):
            self.headings.append((int(tag[1]), "".join(self._text)))
        elif tag in ("th", "td"):
            self.tables[-1][-1].append("".join(self._text))
        if re.fullmatch(r"h[1-6]|th|td", tag):
            self._text = None


def test_the_html_has_the_headings_and_tables_of_the_markdown(report):
    md = report.read_text()
    page = _Page((report.parent / "report.html").read_text())
    assert page.headings == [(len(m[1]), m[2]) for m in re.finditer(r"^(#{1,6}) (.*)$", md, re.MULTILINE)]
    blocks = re.findall(r"(?:^\|.*\|\n)+", md, re.MULTILINE)
    tables = [[[c.strip() for c in line.strip("|").split("|")] for line in b.splitlines()] for b in blocks]
    # the summary tables, and each featured cell's modality-pattern table
    assert len(tables) == 5 + md.count("#### Modality patterns (held-out patients")
    assert page.tables == [[t[0], *t[2:]] for t in tables]  # the "---:" line aligns, it is not a row


def test_a_run_name_with_html_is_shown_as_text_in_the_html_never_run(tmp_path):
    root = make_results(tmp_path / "r", datasets=(("mini3", 3, False),), strategies=("fedavg",), privacies=("off",),
                        n_held=40, n_site=5)
    doc = json.loads((root / "results.json").read_text())
    name = "<script>alert(1)</script>"
    doc["experiment"]["name"] = name
    for r in doc["rows"]:
        r["strategy"] = name if r["strategy"] else r["strategy"]
    (root / "results.json").write_text(json.dumps(doc))
    md = build_report(root).read_text()
    assert md.startswith(f"# OncoFed experiment report: {name}\n")  # the Markdown keeps the name as it is
    html = (root / "report" / "report.html").read_text()
    page = _Page(html)
    assert "script" not in page.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert page.headings[0] == (1, f"OncoFed experiment report: {name}")  # shown as the text it is
    assert [name, "no DP"] == page.tables[0][-1][1:3]  # the federated row of the summary table


def test_demographic_parity_and_equalized_odds_on_a_hand_example():
    # group A: y 0 0 1 1, pred 0 1 1 1; group B: y 0 1 1 1, pred 0 0 1 0
    y = [0, 0, 1, 1, 0, 1, 1, 1]
    pred = [0, 1, 1, 1, 0, 0, 1, 0]
    group = ["A"] * 4 + ["B"] * 4
    # P(pred=0 | A) = 1/4, P(pred=0 | B) = 3/4 -> 0.5 (class 1 mirrors it)
    assert demographic_parity_gap(y, pred, group, min_patients=1) == pytest.approx(0.5)
    # class 0: TPR 1/2 vs 1/1, FPR 0/2 vs 2/3 -> 2/3; class 1: TPR 1 vs 1/3 -> 2/3, FPR 1/2 vs 0 -> 1/2
    assert equalized_odds_gap(y, pred, group, min_patients=1) == pytest.approx(2 / 3)
    t = subgroup_table(y, pred, group, min_patients=1)
    assert t.patients.tolist() == [4, 4] and t.accuracy.tolist() == [0.75, 0.5]


def test_small_groups_and_undefined_rates_stay_out_of_the_gaps():
    y = [0, 0, 1, 1, 0, 1, 1, 1]
    pred = [0, 1, 1, 1, 0, 0, 1, 0]
    group = ["A"] * 4 + ["B"] * 4
    # a 2-patient group that predicts everything wrong changes nothing when below min_patients
    y2, pred2, group2 = y + [0, 1], pred + [1, 0], group + ["C", "C"]
    assert demographic_parity_gap(y2, pred2, group2, min_patients=3) == pytest.approx(0.5)
    assert equalized_odds_gap(y2, pred2, group2, min_patients=3) == pytest.approx(2 / 3)
    assert subgroup_table(y2, pred2, group2, min_patients=3).in_gaps.tolist() == [True, True, False]
    # class 2 exists in A and B only: its TPR (1 vs 0) must not count; C has no "not class 0" patient, so class 0's
    # FPR is undefined there and does not count either; every defined rate agrees -> 0
    y3, pred3, g3 = [2, 0, 2, 0, 0, 0], [2, 0, 0, 0, 0, 0], ["A", "A", "B", "B", "C", "C"]
    assert equalized_odds_gap(y3, pred3, g3, min_patients=1) == pytest.approx(0.0)
    assert math.isnan(demographic_parity_gap(y, pred, ["A"] * 8, min_patients=1))
    assert math.isnan(equalized_odds_gap(y, pred, group, min_patients=10))


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a callback keeps "report" a sub-command, as in the real `oncofed` app
        """test app"""

    register(app)
    return app


def test_cli_names_the_missing_results_file_and_the_fix(tmp_path):
    res = CliRunner().invoke(_cli(), ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert f"{tmp_path / 'results.json'} not found: run `oncofed experiment CONFIG.toml` first" in res.output
    assert len(res.output.strip().splitlines()) == 1
    (tmp_path / "results.json").write_text("{not json")
    res = CliRunner().invoke(_cli(), ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert "results.json is not readable JSON" in res.output and "oncofed experiment" in res.output
    (tmp_path / "results.json").write_text(json.dumps({"rows": [{"cell": "x"}]}))
    res = CliRunner().invoke(_cli(), ["report", str(tmp_path)])
    assert res.exit_code == 2 and "rows lack data, method, round, site" in res.output


def test_cli_writes_a_report_of_a_partial_results_directory_to_out(tmp_path):
    """A run still going (no predictions/final.json yet, privacy as a JSON number) still gives a report saying why."""
    root = make_results(tmp_path / "r", datasets=(("mini3", 3, False),), strategies=("fedavg",), n_held=40, n_site=5)
    doc = json.loads((root / "results.json").read_text())
    for r in doc["rows"]:
        r["privacy"] = 8.0 if r["privacy"] == "8" else r["privacy"]
    (root / "results.json").write_text(json.dumps(doc))
    (root / "cells" / "mini3-fedavg-off-s0" / "predictions.npz").unlink()
    (root / "cells" / "mini3-fedavg-8-s0" / "final.json").unlink()
    pooled = root / "cells" / "mini3-pooled-s0" / "predictions.npz"  # strings as object arrays (pandas .to_numpy())
    arrays = dict(np.load(pooled))
    np.savez(pooled, **{**arrays, "gender": arrays["gender"].astype(object), "site": arrays["site"].astype(object)})
    stale = tmp_path / "rep" / "figures" / "roc_an-earlier-cell.png"  # an earlier report's figure in the same --out
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG)
    res = CliRunner().invoke(_cli(), ["report", str(root), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert not stale.exists()  # a figure this report does not show is not left beside it
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "report.html").is_file()
    assert "**Cost of privacy, ε=8**" in md  # 8.0 and "8" are the same budget
    assert "*Plot not drawn: cells/mini3-fedavg-off-s0/predictions.npz not found" in md
    assert "*Plot not drawn: cells/mini3-fedavg-8-s0/final.json not found" in md
    assert re.search(r"predictions.npz stores (gender, site|site, gender) as pickled object arrays", md)
    assert "*Plot not drawn: predictions.npz lacks site.*" in md  # the t-SNE map needs the site of every row
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / "rep" / rel).read_bytes()[:8] == PNG


def test_the_per_site_figure_falls_back_to_local_logistic_when_no_local_transformer_ran(tmp_path):
    """A grid with only local-logistic among its local baselines got 'No local-only baseline for this data set.'"""
    root = make_results(tmp_path / "results", datasets=(("mini3", 3, False),), strategies=("fedavg",))
    doc = json.loads((root / "results.json").read_text())
    doc["rows"] = [r for r in doc["rows"] if r["method"] != "local"]
    (root / "results.json").write_text(json.dumps(doc))
    md = build_report(root).read_text()
    assert "No local-only baseline" not in md
    assert "Local-only logistic regressions (local-logistic): seed 0." in md
