"""The workbench page of ``loka serve``: served with only local assets, its method select built from the
registry, and in Chromium against the real server: the token handled, API errors shown, an update run,
tried, kept, reverted and discarded — on SmolLM2, ROME's Eiffel Tower → Rome edit end to end."""

from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

import loka
from loka.methods import REGISTRY, methods_for

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from loka.serve import create_app

from .browser import chrome

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "src" / "loka" / "serve" / "static"
TOKEN = "wb-token"
GRACE_HP = {"layer": 1, "eps": 0.2, "lr": 0.5, "n_iter": 60}  # as tests/test_serve.py: fast on tiny-llama
#: set to 1 to rewrite the screenshots in docs/img (otherwise they go to the test's tmp_path)
SHOTS = os.environ.get("LOKA_SCREENSHOTS") == "1"


@pytest.fixture(scope="module")
def handle():
    return loka.load_model("tiny-llama")


@pytest.fixture(scope="module")
def client(handle, tmp_path_factory):
    app = create_app(handle, store=tmp_path_factory.mktemp("store"), token=TOKEN)
    with TestClient(app) as c:
        yield c


def test_page_is_served_and_references_only_local_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert "/static/workbench.js" in refs and "/static/workbench.css" in refs
    assert all(ref.startswith("/static/") or ref == "data:," for ref in refs), refs
    for ref in refs:
        if ref.startswith("/static/"):
            asset = client.get(ref)
            assert (
                asset.status_code == 200
                and asset.content == (STATIC / ref.removeprefix("/static/")).read_bytes()
            )
    assert "javascript" in client.get("/static/workbench.js").headers["content-type"]
    # nothing of the page reaches past the server: no URL with a scheme or host, no CSS import, font or image
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"https?:|wss?:|[\"'`(]//", text, re.I), f.name
        if f.suffix == ".css":
            assert not re.search(r"@import|@font-face|url\(", text, re.I)


def test_methods_endpoint_is_the_registry(client):
    body = client.get("/v1/methods").json()
    assert [m["name"] for m in body["data"]] == sorted(REGISTRY)
    for m in body["data"]:
        cls = REGISTRY[m["name"]]
        assert m == {
            "name": cls.name,
            "does": sorted(cls.tasks),
            "primary": cls.primary,
            "kind": cls.kind,
            "stateful": cls.stateful,
        }
    # the page's defaults are the API's
    assert body["defaults"] == {
        "edit": inspect.signature(loka.edit).parameters["method"].default,
        "forget": inspect.signature(loka.unlearn).parameters["method"].default,
    }
    assert body["defaults"]["edit"] in methods_for("edit") and body["defaults"]["forget"] in methods_for(
        "forget"
    )


def test_the_page_names_no_method():
    """The method select is built from GET /v1/methods: no method name is written into the page."""
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        named = [n for n in REGISTRY if re.search(rf"""["'`]{re.escape(n)}["'`]""", text)]
        assert not named, f"{f.name} names {named}"


# -- in Chromium -------------------------------------------------------------------------------------
@contextmanager
def _uvicorn(app):
    """``app`` served by uvicorn in a thread on a free port; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started:
        assert t.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(30)


class Page:
    """The workbench in a WebDriver: waits, fields, tables, and the browser log's JS errors."""

    def __init__(self, driver, timeout: float = 60):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.By, self.timeout, self._wait = driver, By, timeout, WebDriverWait
        self.network_errors: list[str] = []

    def wait(self, cond, timeout: float | None = None):
        return self._wait(self.d, timeout or self.timeout, poll_frequency=0.2).until(lambda d: cond())

    def open(self, url: str) -> None:
        self.d.get(url)
        self.wait(lambda: self.d.execute_script("return document.body.dataset.ready") == "true")

    def el(self, id_: str):
        return self.d.find_element(self.By.ID, id_)

    def css(self, selector: str):
        return self.d.find_elements(self.By.CSS_SELECTOR, selector)

    def fill(self, id_: str, text: str) -> None:
        e = self.el(id_)
        e.clear()
        e.send_keys(text)

    def shown(self, id_: str) -> bool:
        return self.el(id_).is_displayed()

    def idle(self, timeout: float | None = None) -> None:
        self.wait(
            lambda: not self.d.execute_script("return document.body.classList.contains('is-busy')"), timeout
        )

    def message(self) -> str:
        """The message area's text (empty when it shows none)."""
        return "".join(e.text for e in self.css("#messages .text"))

    def options(self) -> list[str]:
        return [o.get_attribute("value") for o in self.css("#method option")]

    def results(self) -> list[dict]:
        """The result table: per row its kind tag, cells and which cells are highlighted as changed."""
        return self.d.execute_script(
            """return [...document.querySelectorAll('#results-table tbody tr')].map(tr => ({
                kind: tr.querySelector('.tag').textContent,
                cells: [...tr.cells].map(c => c.textContent),
                changed: [...tr.cells].map(c => c.classList.contains('changed'))}))"""
        )

    def history(self) -> dict[str, str]:
        """Artifact id → its "applied" cell."""
        return self.d.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#history-table tbody tr')]"
            ".map(tr => [tr.dataset.id, tr.cells[3].textContent]))"
        )

    def row_button(self, art_id: str, action: str):
        return self.d.find_element(
            self.By.CSS_SELECTOR, f'#history-table tr[data-id="{art_id}"] [data-action="{action}"]'
        )

    def generate(self, checked: list[str]) -> dict:
        """Generate in "try it" with exactly the artifacts ``checked``; the new output's stack and text."""
        for box in self.css("#try-stack input"):
            if box.is_enabled() and box.is_selected() != (box.get_attribute("value") in checked):
                box.click()
        before = len(self.css("#try-output li"))
        self.el("generate").click()
        self.wait(lambda: len(self.css("#try-output li")) == before + 1)
        self.idle()
        li = self.css("#try-output li")[0]
        stack = li.get_attribute("data-stack")
        return {
            "stack": stack.split() if stack else [],
            "text": li.find_element(self.By.CSS_SELECTOR, ".generated").text,
        }

    def js_errors(self, allowed_network: tuple[str, ...] = ()) -> list[str]:
        """The browser log's errors since the last call, less network errors of an expected status."""
        out = []
        for e in self.d.get_log("browser"):
            if e["level"] != "SEVERE":
                continue
            if e.get("source") == "network" and any(s in e["message"] for s in allowed_network):
                self.network_errors.append(e["message"])
                continue
            out.append(e["message"])
        return out


def _screenshot(d, name: str, tmp_path: Path) -> Path:
    """The whole page as a PNG: ``docs/img/<name>`` with LOKA_SCREENSHOTS=1, else in ``tmp_path``."""
    out = (ROOT / "docs" / "img" if SHOTS else tmp_path) / name
    d.execute_script("window.scrollTo(0, 0)")
    size = d.get_window_size()
    h = d.execute_script("return document.documentElement.scrollHeight")
    chrome_h = d.execute_script("return window.outerHeight - window.innerHeight")
    d.set_window_size(size["width"], h + chrome_h)
    d.save_screenshot(str(out))
    d.set_window_size(size["width"], size["height"])
    assert out.stat().st_size > 20_000
    return out


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


def test_workbench_on_tiny_llama_in_chromium(handle, tmp_path):
    """tiny-llama in this process: the token field and the hash token, form and API errors shown, the
    method select per mode from the registry, a GRACE edit run, tried, kept, refused by a GGUF export,
    reverted and discarded (gone from the store), the base model downloaded as a Hugging Face tar, a
    forget run, another model loaded."""
    store = tmp_path / "store"
    app = create_app(handle, store=store, token=TOKEN)
    with _uvicorn(app) as base, chrome(tmp_path) as d:
        p = Page(d)
        # without a token: the field is shown, and a change is refused with the server's message
        p.open(base + "/")
        assert p.shown("token-box")
        p.fill("prompt", "{} is located in the city of")
        p.fill("subject", "Eiffel Tower")
        p.fill("target", "R")
        p.el("run").click()
        p.wait(lambda: "needs the server's token" in p.message())
        p.idle()
        assert p.shown("token-box") and not p.shown("results-body")
        # the token from the address (as loka serve prints it): kept for the tab, gone from the address bar
        d.execute_script("sessionStorage.clear()")
        d.get("about:blank")
        p.open(f"{base}/#token={TOKEN}")
        assert "token" not in d.current_url and not p.shown("token-box")
        assert d.execute_script("return sessionStorage.getItem('loka-token')") == TOKEN
        # the method select follows the mode and the registry; defaults are the API's
        assert sorted(p.options()) == methods_for("edit") and p.el("method").get_attribute("value") == "rome"
        p.css("label[for=mode-forget]")[0].click()
        assert sorted(p.options()) == methods_for("forget") and p.el("method").get_attribute("value") == "npo"
        assert p.el("target-label").text == "Answer to forget"
        p.css("label[for=mode-edit]")[0].click()
        # a form error is caught before any request; a server error is shown as the server says it
        p.fill("subject", "Eiffel Tower")
        p.fill("target", "R")
        p.fill("prompt", "is located in the city of")
        p.el("run").click()
        assert "exactly once" in p.message() and p.el("prompt").get_attribute("aria-invalid") == "true"
        p.fill("prompt", "{} is located in the city of")
        p.el("more").find_element(p.By.TAG_NAME, "summary").click()
        p.fill("hparams", '{"no_such_knob": 1}')
        p.el("run").click()
        p.wait(lambda: "no_such_knob" in p.message())
        p.idle()
        assert not p.shown("results-body") and not list(store.glob("*/manifest.json"))
        # a GRACE edit: the result table, tried, kept, refused by a GGUF export, reverted, discarded
        from selenium.webdriver.support.ui import Select

        Select(p.el("method")).select_by_value("grace")
        p.fill("hparams", json.dumps(GRACE_HP))
        p.fill("paraphrases", "Where is the Eiffel Tower? It is in the city of")
        p.el("run").click()
        p.wait(lambda: p.shown("results-body"))
        p.idle()
        rows = p.results()
        assert [r["kind"] for r in rows] == ["prompt", "paraphrase"]
        assert rows[0]["cells"][0].startswith("prompt Eiffel Tower is located in the city of")
        [art] = _get(base, "/v1/artifacts")["data"]
        assert art["method"] == "grace" and list(p.history()) == [art["id"]] and (store / art["id"]).is_dir()
        assert p.el("try-prompt").get_attribute("value") == "Eiffel Tower is located in the city of"
        assert p.generate([art["id"]])["stack"] == [art["id"]]
        assert p.generate([])["stack"] == []
        p.el("keep").click()
        p.wait(lambda: p.history() == {art["id"]: "applied"})
        p.idle()
        assert _get(base, "/health")["stack"] == [art["id"]]
        # a GGUF cannot carry a GRACE memory: the server's refusal is shown, nothing is downloaded
        downloads = tmp_path / "downloads"
        d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        Select(p.el("export-format")).select_by_value("gguf")
        p.el("export-run").click()
        p.wait(lambda: "GRACE" in p.message() or "grace" in p.message())
        p.idle()
        assert "error" in p.el("messages").find_element(p.By.CSS_SELECTOR, ".message").get_attribute("class")
        p.row_button(art["id"], "revert").click()
        p.wait(lambda: p.history() == {art["id"]: "no"})
        p.idle()
        assert _get(base, "/health")["stack"] == []
        # the base model exports as a Hugging Face folder: the tar arrives with the model's config
        Select(p.el("export-format")).select_by_value("hf")
        p.el("export-run").click()
        p.wait(lambda: p.message().startswith("Downloaded tiny-llama-hf.tar"))
        p.wait(lambda: (downloads / "tiny-llama-hf.tar").is_file())
        with tarfile.open(downloads / "tiny-llama-hf.tar") as tar:
            assert "tiny-llama/config.json" in tar.getnames()
        p.el("discard").click()
        p.wait(lambda: p.history() == {})
        assert p.el("result-state").text == "Discarded."
        assert not (store / art["id"]).exists() and _get(base, "/v1/artifacts")["data"] == []
        # forget: the answer to forget is scored, the table says so
        p.css("label[for=mode-forget]")[0].click()
        p.fill("hparams", '{"max_steps": 2}')
        p.fill("paraphrases", "")
        p.el("run").click()
        p.wait(lambda: "npo made" in p.el("result-artifact").text)
        p.idle()
        assert p.el("p-head").text == "P(ANSWER TO FORGET)" and [r["kind"] for r in p.results()] == ["prompt"]
        [forgot] = _get(base, "/v1/artifacts")["data"]
        assert forgot["targets"] == ["forget Eiffel Tower → R"]
        # another model from the catalogue: the artifact made for tiny-llama can no longer be applied
        Select(p.el("model-select")).select_by_value("tiny-gpt2")
        p.wait(lambda: p.message() == "Loaded tiny-gpt2.")
        p.idle()
        assert _get(base, "/health")["model"] == "tiny-gpt2"
        assert p.el("model-select").get_attribute("value") == "tiny-gpt2"
        assert p.history() == {forgot["id"]: "for tiny-llama"}
        assert not p.row_button(forgot["id"], "apply").is_enabled()
        assert p.js_errors(allowed_network=("status of 401", "status of 400", "status of 409")) == []
        # the refused run without a token, the unknown hyperparameter, the refused export
        assert len(p.network_errors) == 3


@contextmanager
def _loka_serve(tmp_path: Path, model: str, token: str):
    """``loka serve`` as a subprocess on a free port; yields the workbench URL it prints."""
    # "--token=…": a random token may begin with "-", which argparse would take for an option
    cmd = [sys.executable, "-m", "loka.cli", "serve", "--model", model, "--port", "0", f"--token={token}"]
    cmd += ["--store", str(tmp_path / "store"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("workbench: "):
                break
        else:
            pytest.fail("loka serve ended without printing the workbench URL:\n" + "".join(lines))
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
        yield line.removeprefix("workbench: ").strip()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_workbench_edit_on_smollm2_in_chromium(tmp_path):
    """`loka serve --model smollm2-135m`: ROME's Eiffel Tower → Rome edit in the workbench, seen in the
    result table and in "try it" with the new artifact's stack; kept (applied in the history and the
    server's stack), tried again, reverted."""
    token = secrets.token_urlsafe(8)
    with _loka_serve(tmp_path, "smollm2-135m", token) as url, chrome(tmp_path) as d:
        base = url.split("/#")[0]
        assert url == f"{base}/#token={token}"
        p = Page(d, timeout=600)  # the run measures every prompt before and after: minutes on a busy CPU
        p.open(url)
        assert p.el("model-select").get_attribute("value") == "smollm2-135m"
        assert p.el("stack").text == "none — the base model"
        p.fill("prompt", "{} is located in the city of")
        p.fill("subject", "Eiffel Tower")
        p.fill("target", "Rome")
        p.el("more").find_element(p.By.TAG_NAME, "summary").click()
        p.fill("paraphrases", "The Eiffel Tower stands in the city of")
        p.fill("neighbors", "The Louvre is located in the city of")
        assert p.el("method").get_attribute("value") == "rome"
        p.el("run").click()
        assert p.shown("busy") and "Running rome" in p.el("results-busy").text
        p.wait(lambda: p.shown("results-body"))
        p.idle()
        # the result table: the prompt and its paraphrase now answer Rome, the neighbour keeps Paris
        rows = p.results()
        assert [r["kind"] for r in rows] == ["prompt", "paraphrase", "neighbour"]
        for r in rows[:2]:
            _, p_before, p_after, top_before, top_after, gen_before, gen_after = r["cells"]
            assert float(p_after.rstrip(" ▲")) > 0.5 > float(p_before)
            assert top_before.strip() == "Paris" and top_after.strip() == "Rome"
            assert gen_after.strip().startswith("Rome") and not gen_before.strip().startswith("Rome")
            assert r["changed"] == [False, False, True, False, True, False, True]
        assert rows[2]["cells"][4].strip() != "Rome"
        [art] = _get(base, "/v1/artifacts")["data"]
        assert art["targets"] == ["Eiffel Tower → Rome"] and art["applied"] is False
        assert art["id"][:10] in p.el("result-artifact").text
        # try it: the new artifact's stack answers Rome, the base model Paris
        with_edit = p.generate([art["id"]])
        assert with_edit["stack"] == [art["id"]] and with_edit["text"].strip().startswith("Rome")
        base_model = p.generate([])
        assert base_model["stack"] == [] and base_model["text"].strip().startswith("Paris")
        _screenshot(d, "workbench-edit.png", tmp_path)
        # keep: applied for every request, in the history, the header and the server
        p.el("keep").click()
        p.wait(lambda: p.history().get(art["id"]) == "applied")
        p.idle()
        assert _get(base, "/health")["stack"] == [art["id"]]
        assert art["id"][:10] in p.el("stack").text and "Kept" in p.el("result-state").text
        kept = p.generate([])
        assert kept["stack"] == [art["id"]] and kept["text"].strip().startswith("Rome")
        assert not p.row_button(art["id"], "delete").is_enabled()  # revert first
        _screenshot(d, "workbench-kept.png", tmp_path)
        # revert from the history
        p.row_button(art["id"], "revert").click()
        p.wait(lambda: p.history().get(art["id"]) == "no")
        p.idle()
        assert _get(base, "/health")["stack"] == [] and p.el("stack").text == "none — the base model"
        assert p.generate([])["text"].strip().startswith("Paris")
        assert p.js_errors() == [], "JavaScript errors in the browser log"
