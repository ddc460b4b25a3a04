"""``loka serve``: completions answer as ``loka.generate`` does, streamed or not; each request sees exactly
its artifact stack, also under concurrent requests, and the weights come back bit for bit; artifacts are
made, applied, reverted, deleted, downloaded and uploaded through the API; every failure is one JSON
line with the right status; the command line starts the server or says in one line why not."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import tarfile
import threading

import pytest
import torch

import loka

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from loka.artifact import MEMORY_ATTR
from loka.serve import create_app

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EDIT = {
    "prompt": "{} is located in the city of",
    "subject": "Eiffel Tower",
    "target": "R",  # " R": two byte tokens, which ROME can raise on a random model
    "paraphrases": ["Where is the Eiffel Tower? It is in the city of"],
    "neighbors": ["The Louvre is located in the city of"],
}
PROMPT = "Eiffel Tower is located in the city of"
GRACE_HP = {"layer": 1, "eps": 0.2, "lr": 0.5, "n_iter": 60}


@pytest.fixture(scope="module")
def rome_hp(tmp_path_factory):
    """ROME settings that raise a two-token target on a random tiny model (as tests/test_api.py)."""
    from .conftest import PKG_DATA

    texts = []
    for name in ["retain_perturbed_subset_reconstructed.json", "forget10_reconstructed.json"]:
        for rec in json.loads((PKG_DATA / "tofu" / name).read_text()):
            texts.append(f"{rec['question']} {rec['answer']}")
    corpus = tmp_path_factory.mktemp("corpus") / "tofu.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {
        "mom2_n_tokens": 1000,
        "mom2_corpus": str(corpus),
        "layer": 2,
        "clamp_norm_factor": 50.0,
        "v_steps": 30,
        "v_weight_decay": 0.0,
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server on tiny-llama for the module: (client, handle, app)."""
    h = loka.load_model("tiny-llama")
    app = create_app(h, store=tmp_path_factory.mktemp("store"), token=TOKEN)
    with TestClient(app) as client:
        yield client, h, app


@pytest.fixture(scope="module")
def rome_id(served, rome_hp):
    client, _, _ = served
    r = client.post(
        "/v1/artifacts", json={"method": "rome", "hparams": rome_hp, "edit": [EDIT]}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _weights(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def _same(h, w) -> bool:
    return all(torch.equal(v, w[k]) for k, v in h.model.state_dict().items())


def _reset(client) -> None:
    """Leave the model at the global stack (a request without artifacts switches back), so that the test
    may call loka on the handle directly."""
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def _with(h, art, prompt: str, n: int) -> str:
    """``loka.generate`` with ``art`` applied for the call."""
    art.apply(h)
    try:
        return loka.generate(h, [prompt], n)[0]
    finally:
        art.revert(h)


def _events(text: str) -> list:
    """The payloads of a server-sent event stream; the last one must be ``[DONE]``."""
    chunks = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert chunks[-1] == "[DONE]" and all(not c.startswith("data:") for c in chunks)
    return [json.loads(c) for c in chunks[:-1]]


def _error(r, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and "\n" not in err["message"] and "Traceback" not in err["message"]
    return err


# -- completions ------------------------------------------------------------------------------------
def test_greedy_completions_equal_loka_generate(served):
    client, h, _ = served
    _reset(client)
    prompts = ["The Eiffel Tower is located in", "Hello", PROMPT]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 20})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == "tiny-llama"
    for i, p in enumerate(prompts):
        choice = body["choices"][i]
        assert choice["index"] == i and choice["text"] == loka.generate(h, [p], 20)[0]
    n_prompt = sum(len(h.tokenizer(p)["input_ids"]) for p in prompts)
    assert body["usage"]["prompt_tokens"] == n_prompt and body["loka"] == {"artifacts": []}
    assert body["usage"]["total_tokens"] == n_prompt + body["usage"]["completion_tokens"]


def test_a_stream_adds_up_to_the_same_text(served):
    client, _, _ = served
    req = {"prompt": PROMPT, "max_tokens": 16}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    r = client.post(
        "/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    pieces = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert len(pieces) > 2 and "".join(pieces) == whole["text"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 16


def test_stop_strings_end_the_text_streamed_or_not(served):
    client, h, _ = served
    _reset(client)
    full = loka.generate(h, [PROMPT], 16)[0]
    stop = full[5:7]
    cut = full[: full.find(stop)]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "stop": [stop, "zzz"]})
    assert r.json()["choices"][0] == {"text": cut, "index": 0, "logprobs": None, "finish_reason": "stop"}
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "stop": stop, "stream": True}
    )
    events = _events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events) == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_sampling_with_a_seed_repeats(served):
    client, _, _ = served
    req = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a, b = (client.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in range(2))
    other = client.post("/v1/completions", json={**req, "seed": 8}).json()["choices"][0]["text"]
    assert a == b and a != other


def test_chat_without_a_template_joins_the_messages(served):
    client, h, _ = served
    _reset(client)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is it?"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 10})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    want = loka.generate(h, ["system: Be brief.\nuser: Where is it?\nassistant:"], 10)[0]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 10, "stream": True})
    events = _events(r.text)
    assert (
        events[0]["object"] == "chat.completion.chunk"
        and events[0]["choices"][0]["delta"]["role"] == "assistant"
    )
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "length"


# -- artifacts: made through the API, per-request stacks ---------------------------------------------
def test_a_rome_artifact_made_through_the_api_raises_p_target(served, rome_id):
    client, h, app = served
    got = client.get(f"/v1/artifacts/{rome_id}").json()
    assert got["method"] == "rome" and got["kind"] == "weight-delta" and got["model"] == "tiny-llama"
    assert got["requests"] == {"edit": 1, "forget": 0, "retain": 0} and got["targets"] == ["Eiffel Tower → R"]
    assert got["applied"] is False and got["manifest"]["id"] == rome_id
    report = got["report"]
    assert [(r["kind"], r["prompt"]) for r in report] == [
        ("prompt", PROMPT),
        ("paraphrase", EDIT["paraphrases"][0]),
        ("neighbour", EDIT["neighbors"][0]),
    ]
    assert report[0]["after"]["p_target"] > 1.3 * report[0]["before"]["p_target"]
    assert len(report[0]["before"]["top"]) == 5 and isinstance(report[0]["after"]["generation"], str)
    assert (app.state.engine.store.root / rome_id / "manifest.json").is_file()
    assert [a["id"] for a in client.get("/v1/artifacts").json()["data"]][:1] == [rome_id]


def test_per_request_stacks_under_concurrent_requests(served, rome_id):
    """Threads ask with and without the artifact, interleaved: each gets the answer of its own stack,
    and the weights are the base ones bit for bit afterwards."""
    client, h, app = served
    _reset(client)
    w0 = _weights(h)
    base = loka.generate(h, [PROMPT], 12)[0]
    edited = _with(h, app.state.engine.store.get(rome_id), PROMPT, 12)
    assert edited != base
    wrong, errors = [], []

    def worker(k: int) -> None:
        try:
            for i in range(6):
                arts = [rome_id] if (i + k) % 2 else []
                body = {"prompt": PROMPT, "max_tokens": 12, "artifacts": arts, "stream": i % 3 == 0}
                r = client.post("/v1/completions", json=body)
                text = (
                    "".join(e["choices"][0]["text"] for e in _events(r.text))
                    if body["stream"]
                    else r.json()["choices"][0]["text"]
                )
                if text != (edited if arts else base):
                    wrong.append((k, i, arts, text))
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not wrong
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "artifacts": [rome_id]})
    assert r.json()["loka"] == {"artifacts": [rome_id]}
    client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})  # back to the base stack
    assert _same(h, w0)


def test_a_grace_memory_works_per_request(served):
    client, h, app = served
    _reset(client)
    edit = {"prompt": "{} was born in the city of", "subject": "Zorblax Quint", "target": "Q"}
    r = client.post(
        "/v1/artifacts", json={"method": "grace", "hparams": GRACE_HP, "edit": [edit]}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    gid, text = r.json()["id"], "Zorblax Quint was born in the city of"
    assert r.json()["kind"] == "memory"
    edited = _with(h, app.state.engine.store.get(gid), text, 4)
    base = loka.generate(h, [text], 4)[0]
    assert edited.startswith(" Q") and not base.startswith(" Q")
    for arts, want in (([gid], edited), ([], base), ([gid], edited), ([], base)):
        r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 4, "artifacts": arts})
        assert r.json()["choices"][0]["text"] == want
    assert h.model.__dict__.get(MEMORY_ATTR) == []  # the last request had no stack: no hook is left


def test_probe_shows_before_and_after(served, rome_id):
    client, h, _ = served
    _reset(client)
    want_p, want_gen = loka.target_logprobs(h, [PROMPT], ["R"])[0]["prob"], loka.generate(h, [PROMPT], 6)[0]
    body = {"prompts": [PROMPT, "Hello"], "targets": ["R", None], "max_tokens": 6}
    before = client.post("/v1/probe", json=body).json()["data"]
    after = client.post("/v1/probe", json={**body, "artifacts": [rome_id]}).json()["data"]
    assert [r["prompt"] for r in before] == [PROMPT, "Hello"] and before[1]["p_target"] is None
    assert before[0]["p_target"] == pytest.approx(want_p)
    assert after[0]["p_target"] > 1.3 * before[0]["p_target"]
    assert before[0]["generation"] == want_gen
    top = before[0]["top"]
    assert len(top) == 5 and all(set(t) == {"token", "p"} for t in top) and top[0]["p"] >= top[-1]["p"]


def test_apply_revert_delete_and_their_conflicts(served, rome_hp):
    client, h, app = served
    _reset(client)
    edit = {**EDIT, "subject": "Louvre", "prompt": "The {} is located in the city of"}
    r = client.post(
        "/v1/artifacts", json={"method": "rome", "hparams": rome_hp, "edit": [edit]}, headers=AUTH
    )
    aid, text = r.json()["id"], "The Louvre is located in the city of"
    edited = _with(h, app.state.engine.store.get(aid), text, 10)
    w0 = _weights(h)
    assert client.post(f"/v1/artifacts/{aid}/apply", headers=AUTH).json() == {"stack": [aid]}
    assert client.get("/health").json()["stack"] == [aid] == client.get("/v1/stack").json()["stack"]
    assert (
        client.post("/v1/completions", json={"prompt": text, "max_tokens": 10}).json()["choices"][0]["text"]
        == edited
    )
    assert [a["applied"] for a in client.get("/v1/artifacts").json()["data"] if a["id"] == aid] == [True]
    _error(client.post(f"/v1/artifacts/{aid}/apply", headers=AUTH), 409, "conflict_error")
    _error(client.delete(f"/v1/artifacts/{aid}", headers=AUTH), 409, "conflict_error")
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 10, "artifacts": [aid]})
    assert r.json()["loka"]["artifacts"] == [aid]  # already global: applied once
    assert client.post(f"/v1/artifacts/{aid}/revert", headers=AUTH).json() == {"stack": []}
    _error(client.post(f"/v1/artifacts/{aid}/revert", headers=AUTH), 409, "conflict_error")
    client.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert _same(h, w0)
    folder = app.state.engine.store.root / aid
    assert client.delete(f"/v1/artifacts/{aid}", headers=AUTH).json() == {"id": aid, "deleted": True}
    assert not folder.exists()
    _error(client.get(f"/v1/artifacts/{aid}"), 404, "not_found_error")
    _error(client.delete(f"/v1/artifacts/{aid}", headers=AUTH), 404, "not_found_error")
    err = _error(
        client.post("/v1/completions", json={"prompt": text, "artifacts": [aid]}), 404, "not_found_error"
    )
    assert aid in err["message"]


def test_create_applied_and_forget_sets(served):
    client, h, _ = served
    forget = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "French"}
    retain = {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target": "Paris"}
    body = {
        "method": "ga",
        "hparams": {"max_steps": 2},
        "forget": [forget],
        "retain": [retain],
        "apply": True,
    }
    r = client.post("/v1/artifacts", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["requests"] == {"edit": 0, "forget": 1, "retain": 1} and a["applied"] is True
    assert a["targets"] == ["forget Danielle Darrieux → French", "keep Eiffel Tower → Paris"]
    assert [(x["set"], x["target"]) for x in a["report"]] == [("forget", "French"), ("retain", "Paris")]
    assert client.get("/v1/stack").json()["stack"] == [a["id"]]
    assert client.post(f"/v1/artifacts/{a['id']}/revert", headers=AUTH).status_code == 200


def test_mutating_endpoints_need_the_token(served, rome_id):
    client, _, _ = served
    calls = [
        ("post", "/v1/artifacts", {"edit": [EDIT]}),
        ("post", f"/v1/artifacts/{rome_id}/apply", None),
        ("post", f"/v1/artifacts/{rome_id}/revert", None),
        ("delete", f"/v1/artifacts/{rome_id}", None),
        ("post", "/v1/artifacts/upload", None),
        ("post", "/v1/models/load", {"model": "tiny-gpt2"}),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for verb, path, body in calls:
            r = getattr(client, verb)(path, headers=headers, **({"json": body} if body else {}))
            assert _error(r, 401, "authentication_error")["param"] is None
            assert r.headers["www-authenticate"] == "Bearer"
    assert rome_id in [a["id"] for a in client.get("/v1/artifacts").json()["data"]]  # nothing happened
    assert client.get("/health").json()["model"] == "tiny-llama"
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_bad_requests_get_one_line_and_the_field(served, rome_id):
    client, _, _ = served
    r = client.post(
        "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in _error(r, 400, "invalid_request_error")["message"]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"})
    assert _error(r, 422, "invalid_request_error")["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"prompt": "x", "max_token": 3})
    assert _error(r, 422, "invalid_request_error")["param"] == "max_token"
    assert _error(client.post("/v1/completions", json={}), 422, "invalid_request_error")["param"] == "prompt"
    for body, param in (
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "", "max_tokens": 2}, "prompt"),
        ({"prompt": "x", "artifacts": [rome_id, rome_id]}, "artifacts"),
    ):
        assert (
            _error(client.post("/v1/completions", json=body), 400, "invalid_request_error")["param"] == param
        )
    _error(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "not_found_error")
    stream = {"prompt": "x", "stream": True, "artifacts": ["0123456789abcdef"]}  # refused before the stream
    _error(client.post("/v1/completions", json=stream), 404, "not_found_error")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}
    assert (
        _error(client.post("/v1/chat/completions", json=chat), 400, "invalid_request_error")["param"]
        == "max_tokens"
    )
    r = client.post("/v1/artifacts", json={"edit": [{**EDIT, "prompt": "no braces"}]}, headers=AUTH)
    assert _error(r, 400, "invalid_request_error")["param"] == "edit[0]"
    r = client.post("/v1/artifacts", json={"method": "nosuch", "edit": [EDIT]}, headers=AUTH)
    _error(r, 400, "invalid_request_error")
    assert "no such endpoint" in _error(client.get("/v1/nothing"), 404, "not_found_error")["message"]


def test_an_internal_failure_is_a_500_without_traceback(served, monkeypatch):
    _, _, app = served

    def boom(*a, **k):
        raise RuntimeError("secret detail\nTraceback (most recent call last)")

    monkeypatch.setattr(app.state.engine, "complete", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        err = _error(client.post("/v1/completions", json={"prompt": "x"}), 500, "server_error")
    assert "secret" not in err["message"] and "RuntimeError" in err["message"]


# -- download, upload, the store -------------------------------------------------------------------
def test_download_and_upload_round_trip(served, rome_id, tmp_path):
    client, h, _ = served
    r = client.get(f"/v1/artifacts/{rome_id}/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert f'filename="{rome_id}.loka.tar"' in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert sorted(tar.getnames()) == [
            f"{rome_id}.loka/deltas.safetensors",
            f"{rome_id}.loka/manifest.json",
        ]
    other = create_app(h, store=tmp_path / "other", token=TOKEN)
    with TestClient(other) as c2:
        up = c2.post(
            "/v1/artifacts/upload", content=r.content, headers={**AUTH, "content-type": "application/x-tar"}
        )
        assert up.status_code == 201, up.text
        assert up.json()["id"] == rome_id and up.json()["targets"] == ["Eiffel Tower → R"]
        assert [a["id"] for a in c2.get("/v1/artifacts").json()["data"]] == [rome_id]
        _error(c2.post("/v1/artifacts/upload", content=r.content, headers=AUTH), 409, "conflict_error")
        form = c2.post(
            "/v1/artifacts/upload", files={"file": ("a.tar", r.content, "application/x-tar")}, headers=AUTH
        )
        assert form.status_code == 409  # the multipart form reads the same artifact
    assert not [p for p in (tmp_path / "other").iterdir() if p.name.startswith(".")]  # no scratch left


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_uploads_that_do_not_verify_are_refused(served, rome_id, tmp_path):
    client, h, _ = served
    good = client.get(f"/v1/artifacts/{rome_id}/download").content
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        files = {m.name.split("/")[-1]: tar.extractfile(m).read() for m in tar}
    manifest = json.loads(files["manifest.json"])
    manifest["hparams"]["layer"] = 3  # changes what applying does: the id no longer matches
    other = create_app(h, store=tmp_path / "other", token=TOKEN)
    with TestClient(other) as c2:
        for body, words in (
            (b"not a tar", "not a tar"),
            (b"", "empty"),
            (_tar({**files, "evil.sh": b"x"}), "evil.sh"),
            (_tar({"a/../manifest.json": files["manifest.json"]}), "manifest.json"),
            (
                _tar(
                    {
                        "manifest.json": json.dumps(manifest).encode(),
                        "deltas.safetensors": files["deltas.safetensors"],
                    }
                ),
                "id",
            ),
        ):
            err = _error(
                c2.post("/v1/artifacts/upload", content=body, headers=AUTH), 400, "invalid_request_error"
            )
            assert words in err["message"]
        assert c2.get("/v1/artifacts").json()["data"] == []


def test_the_store_skips_folders_that_do_not_verify_and_keeps_them(served, rome_id, tmp_path, caplog):
    client, h, app = served
    root = tmp_path / "store"
    tar = client.get(f"/v1/artifacts/{rome_id}/download").content
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(root, filter="data")
    (root / f"{rome_id}.loka" / "deltas.safetensors").write_bytes(b"broken")
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("keep me")
    with caplog.at_level(logging.WARNING, logger="loka.serve.store"):
        other = create_app(h, store=root, token=TOKEN)
        with TestClient(other) as c2:
            assert c2.get("/v1/artifacts").json()["data"] == []
    assert "skipping" in caplog.text and (root / "notes" / "mine.txt").read_text() == "keep me"
    assert (root / f"{rome_id}.loka" / "deltas.safetensors").read_bytes() == b"broken"


def test_an_artifact_for_other_weights_is_refused_on_apply(served, tmp_path):
    client, h, _ = served
    g = loka.load_model("tiny-gpt2")
    art = loka.edit(
        g,
        loka.EditRequest("{} was born in", "Zorblax Quint", "Q"),
        "grace",
        GRACE_HP,
        apply=False,
        progress=False,
    )
    art.save(tmp_path / "g.loka")
    body = _tar(
        {
            f"g.loka/{n}": (tmp_path / "g.loka" / n).read_bytes()
            for n in ("manifest.json", "deltas.safetensors")
        }
    )
    r = client.post("/v1/artifacts/upload", content=body, headers=AUTH)
    assert r.status_code == 201 and r.json()["model"] == "tiny-gpt2" and r.json()["compatible"] is False
    for call in (
        lambda: client.post(f"/v1/artifacts/{art.id}/apply", headers=AUTH),
        lambda: client.post("/v1/completions", json={"prompt": "x", "artifacts": [art.id]}),
    ):
        assert "tiny-gpt2" in _error(call(), 409, "conflict_error")["message"]
    assert client.delete(f"/v1/artifacts/{art.id}", headers=AUTH).status_code == 200


def test_loading_another_model_clears_the_global_stack(tmp_path, rome_hp):
    h = loka.load_model("tiny-llama")
    app = create_app(h, store=tmp_path / "s", token=TOKEN)
    with TestClient(app) as client:
        r = client.post(
            "/v1/artifacts",
            json={"method": "rome", "hparams": rome_hp, "edit": [EDIT], "apply": True},
            headers=AUTH,
        )
        aid = r.json()["id"]
        assert client.get("/v1/stack").json()["stack"] == [aid]
        _error(
            client.post("/v1/models/load", json={"model": "/etc"}, headers=AUTH), 400, "invalid_request_error"
        )
        assert client.post("/v1/models/load", json={"model": "tiny-gpt2"}, headers=AUTH).json() == {
            "model": "tiny-gpt2",
            "stack": [],
        }
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-gpt2"
        cat = {m["name"]: m["loaded"] for m in client.get("/v1/catalog").json()["data"]}
        assert cat["tiny-gpt2"] is True and cat["tiny-llama"] is False
        assert [a["id"] for a in client.get("/v1/artifacts").json()["data"]] == [aid]  # kept in the store
        _error(client.post(f"/v1/artifacts/{aid}/apply", headers=AUTH), 409, "conflict_error")
        assert (
            client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()["model"]
            == "tiny-gpt2"
        )


def test_the_workbench_page_is_served(served):
    client, _, _ = served
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert client.get("/static/workbench.js").status_code == 200


# -- the command line --------------------------------------------------------------------------------
def test_serve_help(capsys):
    from loka.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--token" in out and "--store" in out and "--max-tokens-limit" in out


def test_serve_without_fastapi_says_what_to_install(monkeypatch, capsys):
    from loka.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    assert main(["serve", "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: loka serve needs FastAPI and uvicorn: pip install 'loka[serve]'"


def test_serve_prints_the_token_and_the_workbench_url(monkeypatch, capsys, tmp_path):
    import uvicorn

    from loka.cli import main

    ran = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets: ran.update(port=sockets[0].getsockname()[1])
    )
    monkeypatch.setenv("LOKA_SERVE_TOKEN", "from-env")
    assert main(["serve", "--model", "tiny-llama", "--port", "0", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    port = ran["port"]
    assert "token: from-env" in out and f"workbench: http://127.0.0.1:{port}/#token=from-env" in out
    with socket.socket() as s:  # a port in use is refused in one line, before the model loads
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", "--model", "tiny-llama", "--port", str(s.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err


# -- SmolLM2 -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_edit_through_the_api_changes_the_answer_for_its_requests_only(smollm2, tmp_path):
    app = create_app(smollm2, store=tmp_path / "s", token=TOKEN)
    w0 = _weights(smollm2)
    q = {"prompt": "The Eiffel Tower is located in the city of", "max_tokens": 8}
    want = loka.generate(smollm2, [q["prompt"]], 8)[0]
    edit = {**EDIT, "target": "Rome", "target_true": "Paris"}
    with TestClient(app) as client:
        r = client.post("/v1/artifacts", json={"method": "rome", "edit": [edit]}, headers=AUTH)
        assert r.status_code == 201, r.text
        aid, report = r.json()["id"], r.json()["report"]
        assert report[0]["after"]["p_target"] > 0.5 > report[0]["before"]["p_target"]
        assert "Rome" in report[0]["after"]["generation"] and "Rome" not in report[0]["before"]["generation"]
        base = client.post("/v1/completions", json=q).json()["choices"][0]["text"]
        edited = client.post("/v1/completions", json={**q, "artifacts": [aid]}).json()["choices"][0]["text"]
        assert base == want and "Paris" in base
        assert "Rome" in edited
        streamed = client.post("/v1/completions", json={**q, "artifacts": [aid], "stream": True})
        assert "".join(e["choices"][0]["text"] for e in _events(streamed.text)) == edited
        chat = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12,
            },
        ).json()
        assert "Paris" in chat["choices"][0]["message"]["content"]
        client.post("/v1/completions", json={**q, "max_tokens": 1})
    assert _same(smollm2, w0)


# -- export ------------------------------------------------------------------------------------------
def test_export_writes_the_served_model_and_leaves_nothing_behind(tmp_path, rome_hp):
    pytest.importorskip("loka.export.gguf")
    from safetensors.torch import load as load_safetensors

    h = loka.load_model("tiny-llama")
    app = create_app(h, store=tmp_path / "s", token=TOKEN)
    with TestClient(app) as client:
        _error(client.get("/v1/export?format=hf"), 401, "authentication_error")
        r = client.post(
            "/v1/artifacts", json={"hparams": rome_hp, "edit": [EDIT], "apply": True}, headers=AUTH
        )
        aid = r.json()["id"]
        art = app.state.engine.store.get(aid)
        [(name, delta)] = art.deltas.items()
        r = client.get("/v1/export?format=hf", headers=AUTH)
        assert r.status_code == 200 and 'filename="tiny-llama-hf.tar"' in r.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            names = set(tar.getnames())
            marker = json.loads(tar.extractfile("tiny-llama/loka-export.json").read())
            weights = load_safetensors(tar.extractfile("tiny-llama/model.safetensors").read())
        assert {"tiny-llama/config.json", "tiny-llama/model.safetensors"} <= names
        assert marker["artifacts"] == [aid]
        assert torch.equal(weights[name], h.model.get_parameter(name))  # the edited weight, as served
        client.post(f"/v1/artifacts/{aid}/revert", headers=AUTH)
        assert not torch.equal(weights[name], h.model.get_parameter(name))
        r = client.get("/v1/export?format=gguf&quant=q8_0", headers=AUTH)
        assert r.status_code == 200 and r.content[:4] == b"GGUF"
        _error(client.get("/v1/export?format=gguf&quant=q2_k", headers=AUTH), 422, "invalid_request_error")
        edit = {"prompt": "{} was born in the city of", "subject": "Zorblax Quint", "target": "Q"}
        body = {"method": "grace", "hparams": GRACE_HP, "edit": [edit], "apply": True}
        assert client.post("/v1/artifacts", json=body, headers=AUTH).status_code == 201
        err = _error(client.get("/v1/export?format=gguf", headers=AUTH), 409, "conflict_error")
        assert "grace" in err["message"]
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]  # scratch folders removed
