"""The site's prediction service (client/serve.py) and batch predictions, on a model trained so that one
feature decides the class: predictions, explanations, validation errors, tokens and roles, audit,
hot reload, rollback, the web page in headless Chromium (when installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from client.model_store import ModelStore
from client.serve import TOKENS_FILE, TokenStore, create_app
from privacy.audit import verify
from shared_models.model import ModelConfig, MultiModalTransformer
from shared_models.site_data import Normalizer
from shared_models.weights import state_arrays
from tests.factories import random_inputs, tiny_schema

N = 600


def _labels(x: torch.Tensor) -> torch.Tensor:
    g0 = x[:, 0]  # expr.g0 decides the class
    return (g0 > -0.45).long() + (g0 > 0.45).long()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from client.training import TrainConfig, fit

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
    settings = {"model-dir": str(root / "models"), "state-dir": str(root / "state")}
    (root / "site.json").write_text(json.dumps(settings))
    tokens = TokenStore(root / "state" / TOKENS_FILE)
    return {"root": root, "schema": schema, "x": x, "y": y, "settings": settings, "data": data,
            "clinician": tokens.add("dr", "clinician"), "admin": tokens.add("it", "admin")}


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
    for needle in ("expr.nope", "unknown feature", "genome", "unknown modality", "'IV' not in", "expr.g1",
                   "prot.p0", "beyond float32"):
        assert needle in text, needle
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


def test_file_upload_health_and_metrics(site, client):
    files = [("files", (p.name, p.read_bytes(), "text/csv")) for p in sorted(site["data"].glob("*.csv"))]
    r = client.post("/v1/predict/file?top_k=0", files=files, headers=_auth(site["clinician"]))
    assert r.status_code == 200 and len(r.json()["predictions"]) == N
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert "oncofed_serve_latency_seconds_bucket" in text and "oncofed_serve_predictions_total" in text


def test_batch_cli(site, tmp_path):
    out = tmp_path / "predictions.csv"
    r = subprocess.run([sys.executable, "-m", "oncofed", "predict", "--site-config", str(site["root"] / "site.json"),
                        "--data", str(site["data"]), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert len(df) == N and (df["predicted"] == [site["schema"].classes[int(v)] for v in site["y"]]).mean() >= 0.8


def test_web_page_in_headless_chromium(site, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    pytest.importorskip("playwright")
    import threading

    import uvicorn
    from playwright.sync_api import sync_playwright

    from simulations.federation import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(site["settings"]), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        pass
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#token", site["clinician"])
            page.set_input_files("#files", [str(f) for f in sorted(site["data"].glob("*.csv"))])
            page.click("#go")
            page.wait_for_selector("tr.prediction", timeout=30000)
            rows = page.locator("tr.prediction td.predicted").all_inner_texts()
            page.screenshot(path=str(site["root"] / "web-page.png"), full_page=False)
            browser.close()
    finally:
        server.should_exit = True
        t.join(10)
    assert len(rows) == N and set(rows) <= set(site["schema"].classes)
    assert (site["root"] / "web-page.png").stat().st_size > 10_000


def test_a_hospital_that_never_trained_fits_its_normalizer_and_serves(site, tmp_path):
    """No normalizer.json in its state: the service refuses to start naming the fix; after
    `oncofed serve fit-normalizer` on its own unlabelled tables it serves the same model."""
    from client.model_store import ModelStoreError

    new_state = tmp_path / "state"
    new_state.mkdir()
    settings = {"model-dir": str(site["root"] / "models"), "state-dir": str(new_state)}
    (tmp_path / "site.json").write_text(json.dumps(settings))
    with pytest.raises(ModelStoreError, match="fit-normalizer"):
        create_app(settings)
    r = subprocess.run([sys.executable, "-m", "oncofed", "serve", "fit-normalizer", "--site-config",
                        str(tmp_path / "site.json"), "--data", str(site["data"])], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"fitted on {N} patients" in r.stdout
    from fastapi.testclient import TestClient

    token = TokenStore(new_state / TOKENS_FILE).add("dr", "clinician")
    resp = TestClient(create_app(settings)).post("/v1/predict", json={"patients": [_patient(site, 3)]},
                                                 headers=_auth(token))
    assert resp.status_code == 200 and resp.json()["model_version"] == "v0002"
