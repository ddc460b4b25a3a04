// The loka workbench: one page over loka serve's HTTP API (no build step, no network but the server).
"use strict";

const TOKEN_KEY = "loka-token";
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  model: null,
  methods: [],
  defaults: {}, // the method of each mode when none is chosen (the API's defaults)
  chosen: {}, // the method chosen in each mode
  artifacts: [], // summaries, newest first
  stack: [], // ids applied globally, bottom first
  result: null, // the artifact of the last run
  busy: false,
};

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || null;
    this.param = error.param || null;
  }
}

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { message: `${method} ${path}: the server did not answer (${e.message})` });
  }
  return res.ok ? res : Promise.reject(await errorOf(res, method, path));
}

async function errorOf(res, method, path) {
  let data = null;
  try {
    data = await res.json();
  } catch (e) {
    data = null;
  }
  if (res.status === 401) showTokenBox(true);
  if (data && data.error && data.error.message) return new ApiError(res.status, data.error);
  if (data && typeof data.detail === "string") return new ApiError(res.status, { message: `${method} ${path}: ${data.detail}` });
  return new ApiError(res.status, { message: `${method} ${path}: HTTP ${res.status} ${res.statusText}` });
}

const getJSON = async (path) => (await call("GET", path)).json();
const postJSON = async (path, body) => (await call("POST", path, body === undefined ? {} : body)).json();

// ---------------------------------------------------------------- messages and busy state

function showMessage(text, kind = "error", param = null) {
  const box = $("messages");
  box.replaceChildren();
  const div = el("div", { class: `message ${kind}` });
  div.append(el("span", { class: "text" }, text));
  if (param) div.append(el("span", { class: "param" }, ` (${param})`));
  const close = el("button", { type: "button", class: "close", "aria-label": "Dismiss" }, "×");
  close.addEventListener("click", () => box.replaceChildren());
  div.append(close);
  box.append(div);
}

function showError(e) {
  const param = e instanceof ApiError ? e.param : null;
  showMessage(e.message, "error", param);
  if (param) {
    const field = { prompt: "prompt", subject: "subject", target: "target", method: "method", hparams: "hparams" }[param.split(/[.[]/).pop()];
    if (field) markInvalid(field);
  }
}

function clearMessage() {
  $("messages").replaceChildren();
  document.querySelectorAll("[aria-invalid=true]").forEach((n) => n.removeAttribute("aria-invalid"));
}

function markInvalid(id) {
  $(id).setAttribute("aria-invalid", "true");
}

let busyTimer = null;

// One request at a time: every control waits, and the indicators of the part of the page that asked
// (data-zone: update, result, try, history, export, model) count the seconds.
function setBusy(text, zone) {
  state.busy = Boolean(text);
  document.body.classList.toggle("is-busy", state.busy);
  for (const b of document.querySelectorAll("button, select")) {
    if (b.id !== "token-save" && !b.classList.contains("close")) b.disabled = state.busy;
  }
  clearInterval(busyTimer);
  const shown = state.busy ? [...document.querySelectorAll(`.busy[data-zone~="${zone}"]`)] : [];
  for (const n of document.querySelectorAll(".busy")) n.hidden = !shown.includes(n);
  if (zone === "update") $("results-empty").hidden = state.busy || Boolean(state.result);
  if (!state.busy) {
    refreshControls();
    return;
  }
  const t0 = Date.now();
  const tick = () => {
    const line = `${text} ${Math.round((Date.now() - t0) / 1000)} s`;
    for (const n of shown) n.querySelector(".busy-text").textContent = line;
  };
  tick();
  busyTimer = setInterval(tick, 500);
}

async function busy(text, zone, fn) {
  if (state.busy) return undefined;
  clearMessage();
  setBusy(text, zone);
  try {
    return await fn();
  } catch (e) {
    showError(e);
    return undefined;
  } finally {
    setBusy(null, zone);
  }
}

// ---------------------------------------------------------------- DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

const shortId = (id) => String(id).slice(0, 10);
const lines = (id) =>
  $(id)
    .value.split("\n")
    .map((s) => s.trim())
    .filter(Boolean);

function fmtP(p) {
  if (p === null || p === undefined || Number.isNaN(p)) return "–";
  if (p >= 0.001) return p.toFixed(3);
  return p.toExponential(1);
}

function fmtTime(t) {
  const d = new Date(typeof t === "number" ? t * 1000 : t);
  if (Number.isNaN(d.getTime())) return String(t ?? "");
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function topToken(top) {
  if (top === null || top === undefined) return "";
  if (Array.isArray(top)) return top.length ? topToken(top[0]) : "";
  if (typeof top === "object") return top.token ?? "";
  return String(top);
}

const shown = (s) => JSON.stringify(String(s ?? "")).slice(1, -1); // whitespace made visible

function targetsOf(a) {
  if (Array.isArray(a.targets)) return a.targets.map((t) => (typeof t === "string" ? t : t.target ?? JSON.stringify(t))).join(", ");
  return "";
}

// ---------------------------------------------------------------- token

function readToken() {
  const m = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY);
  showTokenBox(!state.token);
}

function showTokenBox(show) {
  $("token-box").hidden = !show;
}

// ---------------------------------------------------------------- header: model, stack

async function loadHealth() {
  const h = await getJSON("/health");
  state.model = h.model;
  state.stack = h.stack || [];
  $("version").textContent = h.version ? `loka ${h.version}` : "";
  renderStack();
}

async function loadCatalog() {
  const cat = await getJSON("/v1/catalog");
  const sel = $("model-select");
  sel.replaceChildren();
  for (const m of cat.data) {
    const label = m.installed ? m.name : `${m.name} (not installed)`;
    sel.append(el("option", { value: m.name, disabled: !m.installed && !m.loaded, selected: m.name === state.model }, label));
  }
  if (state.model && ![...sel.options].some((o) => o.value === state.model)) {
    sel.prepend(el("option", { value: state.model, selected: true }, state.model));
  }
}

function renderStack() {
  const ol = $("stack");
  ol.replaceChildren();
  if (!state.stack.length) {
    ol.append(el("li", { class: "chip empty" }, "none — the base model"));
    return;
  }
  const byId = Object.fromEntries(state.artifacts.map((a) => [a.id, a]));
  for (const id of state.stack) {
    const a = byId[id];
    const chip = el("li", { class: "chip", title: a ? `${a.method}: ${targetsOf(a)}` : id });
    chip.append(el("code", {}, shortId(id)));
    if (a) chip.append(` ${a.method}`);
    ol.append(chip);
  }
}

async function switchModel() {
  const name = $("model-select").value;
  if (name === state.model) return;
  const done = await busy(`Loading ${name}…`, "model", async () => {
    await postJSON("/v1/models/load", { model: name });
    return true;
  });
  if (done) showMessage(`Loaded ${name}.`, "info");
  await refresh();
}

// ---------------------------------------------------------------- methods

async function loadMethods() {
  const m = await getJSON("/v1/methods");
  state.methods = m.data;
  state.defaults = m.defaults || {};
  renderMethods();
}

function mode() {
  return $("mode-forget").checked ? "forget" : "edit";
}

function renderMethods() {
  const want = mode();
  const sel = $("method");
  sel.replaceChildren();
  const fits = state.methods.filter((m) => m.does.includes(want));
  const groups = [
    [want === "edit" ? "editing methods" : "unlearning methods", fits.filter((m) => m.primary === want)],
    [want === "edit" ? "unlearning methods with an edit term" : "methods that also forget", fits.filter((m) => m.primary !== want)],
  ];
  for (const [label, ms] of groups) {
    if (!ms.length) continue;
    const g = el("optgroup", { label });
    for (const m of ms) g.append(el("option", { value: m.name }, m.name));
    sel.append(g);
  }
  const names = fits.map((m) => m.name);
  const pick = [state.chosen[want], state.defaults[want]].find((n) => names.includes(n));
  sel.value = pick || names[0] || "";
  describeMethod();
}

function describeMethod() {
  const m = state.methods.find((x) => x.name === $("method").value);
  $("method-about").textContent = m ? `makes a ${m.kind} artifact${m.stateful ? "; keeps state between updates" : ""}` : "";
}

function onMode() {
  const forget = mode() === "forget";
  $("target-label").textContent = forget ? "Answer to forget" : "New answer";
  $("mode-hint").textContent = forget ? "The model should stop giving an answer." : "The model should give a new answer.";
  $("target").placeholder = forget ? "Paris" : "Rome";
  $("p-head").textContent = forget ? "P(answer to forget)" : "P(new answer)";
  renderMethods();
}

// ---------------------------------------------------------------- running an update

function buildRequest() {
  const prompt = $("prompt").value;
  const subject = $("subject").value.trim();
  const target = $("target").value.trim();
  const problems = [];
  if ((prompt.match(/\{\}/g) || []).length !== 1) problems.push(["prompt", "Prompt: write {} exactly once where the subject goes, e.g. “{} is located in the city of”."]);
  if (!subject) problems.push(["subject", "Subject: required (the words {} stands for)."]);
  if (!target) problems.push(["target", mode() === "edit" ? "New answer: required." : "Answer to forget: required."]);
  let hparams = {};
  const raw = $("hparams").value.trim();
  if (raw) {
    try {
      hparams = JSON.parse(raw);
    } catch (e) {
      problems.push(["hparams", `Hyperparameters: not JSON (${e.message}).`]);
    }
    if (hparams === null || typeof hparams !== "object" || Array.isArray(hparams)) problems.push(["hparams", "Hyperparameters: must be a JSON object, e.g. {\"v_lr\": 0.5}."]);
  }
  if (!$("method").value) problems.push(["method", "Method: none is available for this mode."]);
  if (problems.length) {
    problems.forEach(([id]) => markInvalid(id));
    if (problems.some(([id]) => id === "hparams")) $("more").open = true;
    throw new Error(problems.map(([, m]) => m).join(" "));
  }
  const req = { prompt, subject, target };
  const paraphrases = lines("paraphrases");
  const neighbors = lines("neighbors");
  if (paraphrases.length) req.paraphrases = paraphrases;
  if (neighbors.length) req.neighbors = neighbors;
  const body = { method: $("method").value, hparams, apply: false };
  body[mode()] = [req];
  return body;
}

async function runUpdate(ev) {
  ev.preventDefault();
  clearMessage();
  let body;
  try {
    body = buildRequest();
  } catch (e) {
    showMessage(e.message);
    return;
  }
  const art = await busy(`Running ${body.method}…`, "update", () => postJSON("/v1/artifacts", body));
  if (!art) return;
  state.result = art;
  renderResult(body);
  const filled = body[mode()][0];
  $("try-prompt").value = filled.prompt.replace("{}", filled.subject);
  await loadArtifacts();
  setTryChecked([art.id]);
}

function rowKind(row, req) {
  if (row.kind) return { neighborhood: "neighbour", neighbourhood: "neighbour", edit: "prompt" }[row.kind] || row.kind;
  if ((req.paraphrases || []).includes(row.prompt)) return "paraphrase";
  if ((req.neighbors || []).includes(row.prompt)) return "neighbour";
  return "prompt";
}

function renderResult(body) {
  const a = state.result;
  const req = (body && body[mode()] && body[mode()][0]) || {};
  $("results-empty").hidden = true;
  $("results-body").hidden = false;
  const sum = $("result-artifact");
  sum.replaceChildren(
    el("strong", {}, a.method),
    " made ",
    el("code", { title: a.id }, shortId(a.id)),
    ` (${a.kind}) for ${a.model || state.model}`,
    a.seconds ? ` in ${Number(a.seconds).toFixed(1)} s` : "",
    "."
  );
  const tbody = $("results-table").querySelector("tbody");
  tbody.replaceChildren();
  for (const row of a.report || []) {
    const b = row.before || {};
    const f = row.after || {};
    const kind = rowKind(row, req);
    const tr = el("tr", { class: `kind-${kind}` });
    const cell = el("td", { class: "prompt-cell" });
    cell.append(el("span", { class: `tag ${kind}` }, kind), " ", el("span", {}, row.prompt), " ");
    if (row.target) cell.append(el("span", { class: "target" }, `→ ${row.target}`));
    tr.append(cell);
    const pb = b.p_target;
    const pa = f.p_target;
    const moved = typeof pb === "number" && typeof pa === "number" && Math.abs(pa - pb) >= 0.01;
    tr.append(el("td", { class: "num" }, fmtP(pb)));
    const pCell = el("td", { class: `num${moved ? ` changed ${pa > pb ? "up" : "down"}` : ""}` }, fmtP(pa));
    if (moved) pCell.append(el("span", { class: "arrow", "aria-label": pa > pb ? "up" : "down" }, pa > pb ? " ▲" : " ▼"));
    tr.append(pCell);
    const tb = topToken(b.top);
    const ta = topToken(f.top);
    tr.append(el("td", { class: "tok" }, shown(tb)), el("td", { class: `tok${ta !== tb ? " changed" : ""}` }, shown(ta)));
    const gb = b.generation ?? "";
    const ga = f.generation ?? "";
    tr.append(el("td", { class: "gen" }, gb), el("td", { class: `gen${ga !== gb ? " changed" : ""}` }, ga));
    tbody.append(tr);
  }
  renderResultState();
}

function renderResultState() {
  const a = state.result;
  if (!a) return;
  const known = state.artifacts.find((x) => x.id === a.id);
  const applied = state.stack.includes(a.id);
  const msg = $("result-state");
  if (!known) msg.textContent = "Discarded.";
  else if (applied) msg.textContent = "Kept: applied to the model for every request.";
  else msg.textContent = "Not applied yet: keep it to change the model for every request, or try it below first.";
  $("keep").disabled = state.busy || applied || !known;
  $("discard").disabled = state.busy || applied || !known;
}

async function keepResult() {
  const a = state.result;
  if (!a) return;
  await busy("Applying…", "result", () => postJSON(`/v1/artifacts/${encodeURIComponent(a.id)}/apply`));
  await refresh();
}

async function discardResult() {
  const a = state.result;
  if (!a) return;
  await busy("Deleting…", "result", () => call("DELETE", `/v1/artifacts/${encodeURIComponent(a.id)}`));
  await refresh();
}

// ---------------------------------------------------------------- artifacts

async function loadArtifacts() {
  const list = await getJSON("/v1/artifacts");
  state.artifacts = list.data || [];
  renderHistory();
  renderTryStack();
  renderStack();
  renderResultState();
}

function renderHistory() {
  const tbody = $("history-table").querySelector("tbody");
  tbody.replaceChildren();
  $("history-empty").hidden = state.artifacts.length > 0;
  $("history-table").hidden = state.artifacts.length === 0;
  for (const a of state.artifacts) {
    const applied = state.stack.includes(a.id) || a.applied === true;
    const foreign = a.compatible === false;
    const tr = el("tr", { "data-id": a.id, class: applied ? "applied" : foreign ? "foreign" : null });
    tr.append(
      el("td", {}, el("code", { title: a.id }, shortId(a.id))),
      el("td", {}, a.method ?? ""),
      el("td", { class: "targets" }, targetsOf(a)),
      el("td", {}, el("span", { class: `badge ${applied ? "on" : "off"}`, title: foreign ? `made for ${a.model || "another model"}` : null }, applied ? "applied" : foreign ? `for ${a.model || "another model"}` : "no")),
      el("td", { class: "muted" }, fmtTime(a.created))
    );
    const act = el("td", { class: "row-actions" });
    const toggle = el("button", { type: "button", class: applied ? "revert" : "apply", "data-action": applied ? "revert" : "apply", disabled: foreign && !applied }, applied ? "Revert" : "Apply");
    toggle.addEventListener("click", () => toggleApplied(a.id, applied));
    const del = el("button", { type: "button", class: "delete", "data-action": "delete", disabled: applied, title: applied ? "revert it first" : null }, "Delete");
    del.addEventListener("click", () => deleteArtifact(a.id));
    const dl = el("button", { type: "button", class: "download", "data-action": "download" }, "Download");
    dl.addEventListener("click", () => download(`/v1/artifacts/${encodeURIComponent(a.id)}/download`, `${a.id}.loka.tar`, "history"));
    act.append(toggle, del, dl);
    tr.append(act);
    tbody.append(tr);
  }
}

async function toggleApplied(id, applied) {
  const verb = applied ? "revert" : "apply";
  await busy(applied ? "Reverting…" : "Applying…", "history", () => postJSON(`/v1/artifacts/${encodeURIComponent(id)}/${verb}`));
  await refresh();
}

async function deleteArtifact(id) {
  await busy("Deleting…", "history", () => call("DELETE", `/v1/artifacts/${encodeURIComponent(id)}`));
  await refresh();
}

function filenameOf(res, fallback) {
  const cd = res.headers.get("content-disposition") || "";
  const m = cd.match(/filename\*?=(?:UTF-8'')?"?([^";]+)"?/i);
  return m ? decodeURIComponent(m[1]) : fallback;
}

async function download(path, fallback, zone) {
  await busy(zone === "export" ? "Exporting (a minute or more)…" : "Preparing the download…", zone, async () => {
    const res = await call("GET", path);
    const type = res.headers.get("content-type") || "";
    if (type.includes("application/json")) {
      const data = await res.json();
      throw new ApiError(res.status, (data && data.error) || { message: `${path}: the server sent JSON, not a file` });
    }
    const blob = await res.blob();
    const name = filenameOf(res, fallback);
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    showMessage(`Downloaded ${name} (${(blob.size / 1e6).toFixed(1)} MB).`, "info");
  });
}

// ---------------------------------------------------------------- try it

function renderTryStack() {
  const box = $("try-stack");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  box.replaceChildren();
  $("try-stack-empty").hidden = state.artifacts.length > 0;
  for (const a of state.artifacts) {
    const id = `try-${a.id}`;
    const applied = state.stack.includes(a.id);
    const off = applied || a.compatible === false;
    const note = applied ? " (applied to every request)" : a.compatible === false ? ` (made for ${a.model || "another model"})` : "";
    const input = el("input", { type: "checkbox", id, value: a.id, checked: checked.has(a.id) && !off, disabled: off });
    const label = el("label", { for: id, class: off ? "muted" : null }, el("code", {}, shortId(a.id)), ` ${a.method}: ${targetsOf(a)}`, note);
    box.append(el("div", { class: "check" }, input, label));
  }
}

function setTryChecked(ids) {
  for (const i of $("try-stack").querySelectorAll("input")) i.checked = ids.includes(i.value) && !i.disabled;
}

async function generate(ev) {
  ev.preventDefault();
  const prompt = $("try-prompt").value;
  if (!prompt.trim()) {
    markInvalid("try-prompt");
    showMessage("Try it: write a prompt first.");
    return;
  }
  const artifacts = [...$("try-stack").querySelectorAll("input:checked")].map((i) => i.value);
  const max = Math.max(1, Math.min(256, parseInt($("try-max").value, 10) || 12));
  const out = await busy("Generating…", "try", () =>
    postJSON("/v1/completions", { model: state.model, prompt, max_tokens: max, temperature: 0, artifacts })
  );
  if (!out) return;
  const text = out.choices && out.choices[0] ? out.choices[0].text : "";
  const byId = Object.fromEntries(state.artifacts.map((a) => [a.id, a]));
  const stack = out.loka && Array.isArray(out.loka.artifacts) ? out.loka.artifacts : [...state.stack, ...artifacts];
  const named = (id) => `${shortId(id)} ${byId[id] ? byId[id].method : ""}`.trim() + (state.stack.includes(id) ? " (applied)" : "");
  const label = stack.length ? stack.map(named).join(" + ") : "base model";
  const li = el("li", { class: "output", "data-stack": stack.join(" ") });
  li.append(el("div", { class: "stack-label" }, label), el("div", { class: "completion" }, el("span", { class: "given" }, prompt), el("span", { class: "generated" }, text)));
  $("try-output").prepend(li);
}

// ---------------------------------------------------------------- export

async function exportModel(ev) {
  ev.preventDefault();
  const format = $("export-format").value;
  const q = new URLSearchParams({ format });
  if (format === "gguf") q.set("quant", $("export-quant").value);
  await download(`/v1/export?${q}`, `${state.model || "model"}-${format}${format === "gguf" ? ".gguf" : ".tar"}`, "export");
}

// ---------------------------------------------------------------- wiring

function refreshControls() {
  $("export-quant").disabled = state.busy || $("export-format").value !== "gguf";
  renderResultState();
  for (const b of $("history-table").querySelectorAll("button.delete")) {
    if (b.closest("tr").classList.contains("applied")) b.disabled = true;
  }
}

async function refresh() {
  try {
    await loadHealth();
    await Promise.all([loadArtifacts(), loadCatalog()]);
  } catch (e) {
    showError(e);
  }
}

async function start() {
  readToken();
  window.addEventListener("hashchange", readToken); // the printed URL pasted into an open tab
  $("token-box").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = $("token-input").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    state.token = t;
    $("token-input").value = "";
    showTokenBox(false);
    clearMessage();
  });
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", onMode);
  $("method").addEventListener("change", () => {
    state.chosen[mode()] = $("method").value;
    describeMethod();
  });
  $("model-select").addEventListener("change", switchModel);
  $("update-form").addEventListener("submit", runUpdate);
  $("keep").addEventListener("click", keepResult);
  $("discard").addEventListener("click", discardResult);
  $("try-form").addEventListener("submit", generate);
  $("try-clear").addEventListener("click", () => $("try-output").replaceChildren());
  $("export-format").addEventListener("change", refreshControls);
  $("export-form").addEventListener("submit", exportModel);
  for (const id of ["prompt", "subject", "target", "hparams", "try-prompt"]) $(id).addEventListener("input", () => $(id).removeAttribute("aria-invalid"));
  onMode();
  try {
    await Promise.all([loadMethods(), refresh()]);
  } catch (e) {
    showError(e);
  }
  refreshControls();
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
