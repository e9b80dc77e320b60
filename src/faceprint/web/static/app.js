// faceprint web page: plain JavaScript, no build step. Every server error is a JSON
// {"error": "..."} shown in the section's alert line.
"use strict";

const $ = (id) => document.getElementById(id);
let currentJob = null; // the generate job whose faces are shown

async function api(method, url, body) {
  const opts = { method, headers: {} };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  let r;
  try { r = await fetch(url, opts); } catch (e) { throw new Error("the server cannot be reached: is `faceprint serve` still running?"); }
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((data && data.error) || `the server answered ${r.status}`);
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function link(href, text) { return el("a", { href, download: "", text }); }

function showError(section, err) { $(section + "-error").textContent = err ? String(err.message || err) : ""; }

// Start a job (a 202 answer) and poll it until it ends; the section's bar shows its progress.
async function runJob(section, start) {
  showError(section, null);
  const box = $(section + "-job"), bar = box.querySelector("progress"), stage = box.querySelector(".stage");
  const buttons = document.querySelectorAll(`#${section === "gen" ? "generate" : sectionId(section)} button`);
  buttons.forEach((b) => (b.disabled = true));
  box.hidden = false; bar.removeAttribute("value"); stage.textContent = "starting";
  try {
    let job = await start();
    while (job.state === "queued" || job.state === "running") {
      await new Promise((r) => setTimeout(r, 400));
      job = await api("GET", `/api/jobs/${job.id}`);
      stage.textContent = job.stage + (job.total ? ` (${job.done} of ${job.total})` : "");
      if (job.total) { bar.max = job.total; bar.value = job.done; } else bar.removeAttribute("value");
    }
    if (job.state === "failed") throw new Error(job.error);
    box.hidden = true;
    return job.result;
  } catch (e) { box.hidden = true; showError(section, e); return null; }
  finally { buttons.forEach((b) => (b.disabled = false)); }
}
function sectionId(s) { return { fit: "models", fp: "fingerprint", rb: "rebalance", forget: "forget" }[s] || s; }

function model() { return $("model-select").value; }

async function refreshInfo(select) {
  const info = await api("GET", "/api/info");
  const sel = $("model-select"), keep = select || sel.value;
  sel.replaceChildren(...info.models.map((m) => el("option", { value: m.name, text: `${m.name} (${m.photos} photos${m.instance ? ", copy for " + m.recipient : ""})` })));
  if (!info.models.length) sel.append(el("option", { value: "", text: "no model yet: fit one below" }));
  if (keep && info.models.some((m) => m.name === keep)) sel.value = keep;
  updateModelLink();
  const roots = $("data-root");
  if (!roots.options.length) roots.replaceChildren(...info.data.map((d) => el("option", { value: d.root, text: d.name })));
  if (!info.data.length) roots.replaceChildren(el("option", { value: "", text: "none served (start with --data FOLDER)" }));
  const o = info.owner;
  $("owner-status").textContent = `Owner: ${o.has_key ? "key present" : "no key yet"}, ${o.instances} ${o.instances === 1 ? "copy" : "copies"} issued, ` +
    (o.has_calibration ? "verification calibrated." : "verification not calibrated yet.");
  $("footer").textContent = `faceprint ${info.version} · uploads up to ${info.max_upload_mb} MB`;
  if (!info.models.length) $("fit-panel").open = true;
  return info;
}
function updateModelLink() {
  const a = $("model-download");
  a.hidden = !model(); a.href = `/files/models/${encodeURIComponent(model())}`;
}

async function refreshRegistry() {
  try {
    const rows = await api("GET", "/api/registry");
    $("registry").querySelector("tbody").replaceChildren(...rows.map((r) =>
      el("tr", {}, el("td", { text: r.instance }), el("td", { text: r.recipient }), el("td", { text: r.issued_at }), el("td", { text: r.code_prefix + "…" }))));
  } catch (e) { showError("fp", e); }
}

// ---------------------------------------------------------------- fit
async function browse(sub) {
  showError("fit", null);
  const path = sub === undefined ? $("fit-path").value.trim() : sub;
  try {
    const r = await api("GET", `/api/folders?root=${$("data-root").value}&path=${encodeURIComponent(path)}`);
    $("fit-path").value = r.path;
    const items = r.folders.map((f) => el("a", { text: f + "/", onclick: () => browse(r.path ? `${r.path}/${f}` : f) }));
    if (r.path) items.unshift(el("a", { text: "..", onclick: () => browse(r.path.split("/").slice(0, -1).join("/")) }));
    items.push(el("span", { class: "muted", text: `${r.images} photos here` }));
    $("folder-list").replaceChildren(...items);
  } catch (e) { showError("fit", e); }
}
$("browse").addEventListener("click", () => browse());
$("model-select").addEventListener("change", updateModelLink);

$("fit-go").addEventListener("click", async () => {
  const limit = parseInt($("fit-limit").value, 10);
  const res = await runJob("fit", () => api("POST", "/api/fit", {
    root: parseInt($("data-root").value || "0", 10), path: $("fit-path").value.trim(),
    name: $("fit-name").value.trim(), limit: Number.isFinite(limit) ? limit : null }));
  if (res) fitted(res);
});
$("zip-go").addEventListener("click", async () => {
  const f = $("zip-file").files[0];
  if (!f) { showError("fit", "choose a zip file of photos first"); return; }
  const fd = new FormData(); fd.append("file", f); fd.append("name", $("zip-name").value.trim());
  const res = await runJob("fit", () => api("POST", "/api/fit-upload", fd));
  if (res) fitted(res);
});
async function fitted(res) {
  $("fit-result").textContent = `Fitted ${res.model} on ${res.photos} photos (${res.skipped} skipped, ${res.components} components).`;
  await refreshInfo(res.model);
}

// ---------------------------------------------------------------- generate
$("gen-go").addEventListener("click", async () => {
  if (!model()) { showError("gen", "fit or pick a model first"); return; }
  $("face-detail").hidden = true;
  const res = await runJob("gen", () => api("POST", "/api/generate", {
    model: model(), seed: parseInt($("gen-seed").value || "0", 10), n: parseInt($("gen-n").value || "16", 10) }));
  if (!res) return;
  currentJob = res.job;
  const base = `/files/outputs/${res.job}/`;
  $("faces").replaceChildren(...res.faces.map((f) =>
    el("img", { src: base + f.file, alt: `face ${f.index}`, title: `face ${f.index}`, "data-index": f.index, onclick: (ev) => showFace(f.index, ev.target) })));
  $("gen-hint").hidden = false;
  $("gen-downloads").replaceChildren(link(base + res.grid, "grid (PNG)"), link(base + res.provenance, "provenance (JSON)"),
    link(`/files/models/${encodeURIComponent(res.model)}`, "model file"));
});

async function showFace(index, img) {
  document.querySelectorAll("#faces img").forEach((i) => i.classList.remove("selected"));
  if (img) img.classList.add("selected");
  showError("gen", null);
  try {
    const d = await api("GET", `/api/faces/${currentJob}/${index}`);
    $("face-large").src = d.image;
    $("face-map").closest("figure").hidden = !d.map;
    if (d.map) $("face-map").src = d.map; else $("face-map").removeAttribute("src");
    $("face-guard").textContent = d.copy_guard;
    $("face-summary").textContent = d.map
      ? `Face ${d.index} is a collage of ${d.distinct_photos} training photos; the largest part from one photo is ${(d.max_share * 100).toFixed(0)}%.`
      : `Face ${d.index} was made by a learned generator (${d.method}): it copies no training photo, so there is no provenance map.`;
    $("face-sources").replaceChildren(...d.sources.map((s) => el("div", { class: "source" },
      s.thumbnail ? el("img", { src: s.thumbnail, alt: s.name }) : el("div", { class: "noimg", text: "not served" }),
      el("div", { text: `${s.name} · ${(s.share * 100).toFixed(0)}%` }))));
    $("face-downloads").replaceChildren(...[link(d.image, "face (PNG)"), d.map ? link(d.map, "map (PNG)") : null,
      link(d.provenance, "provenance (JSON)")].filter(Boolean));
    $("face-detail").hidden = false;
    $("face-detail").scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (e) { showError("gen", e); }
}
$("face-close").addEventListener("click", () => ($("face-detail").hidden = true));

// ---------------------------------------------------------------- fingerprint
$("fp-go").addEventListener("click", async () => {
  if (!model()) { showError("fp", "fit or pick a model first"); return; }
  const res = await runJob("fp", () => api("POST", "/api/issue", {
    model: model(), recipient: $("fp-recipient").value.trim(), instance: $("fp-instance").value.trim() }));
  if (!res) return;
  $("fp-result").replaceChildren(`Issued ${res.instance} to ${res.recipient} (code ${res.code_prefix}…). `, link(res.download, "download the copy"));
  await refreshRegistry(); await refreshInfo();
});

// ---------------------------------------------------------------- verify
async function verifyFile(file) {
  showError("verify", null); $("verify-words").textContent = ""; $("verify-numbers").hidden = true;
  const fd = new FormData(); fd.append("file", file);
  try {
    const v = await api("POST", "/api/verify", fd);
    const w = $("verify-words"); w.textContent = v.words; w.classList.toggle("no", !v.match);
    const rows = v.details || []; // [label, value] pairs chosen by the server
    $("verify-numbers").querySelector("tbody").replaceChildren(...rows.map(([k, x]) => el("tr", {}, el("th", { text: k }), el("td", { text: x }))));
    $("verify-numbers").hidden = false;
  } catch (e) { showError("verify", e); }
}
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) verifyFile(e.dataTransfer.files[0]); });
$("verify-file").addEventListener("change", (e) => { if (e.target.files[0]) verifyFile(e.target.files[0]); });

// ---------------------------------------------------------------- forget / rebalance
function beforeAfter(target, res) {
  const b = `/files/outputs/${res.job}/`;
  $(target).replaceChildren(
    el("figure", {}, el("img", { src: b + res.before.grid, alt: "before" }), el("figcaption", { text: `before (${res.before.faces.length} faces, seed ${res.seed})` })),
    el("figure", {}, el("img", { src: b + res.after.grid, alt: "after" }), el("figcaption", { text: `after (same seeds)` })));
}
$("forget-go").addEventListener("click", async () => {
  const files = $("forget-files").files;
  if (!model()) { showError("forget", "fit or pick a model first"); return; }
  if (!files.length) { showError("forget", "choose the person's photos first"); return; }
  const fd = new FormData(); fd.append("model", model()); fd.append("name", $("forget-name").value.trim());
  for (const f of files) fd.append("files", f);
  const res = await runJob("forget", () => api("POST", "/api/forget", fd));
  if (!res) return;
  $("forget-result").replaceChildren(`Forgot ${res.forgotten} training photos (${res.not_training_photos} uploaded photos were not training photos); wrote ${res.model}. `, link(res.download, "download"));
  beforeAfter("forget-ba", res); await refreshInfo();
});
$("rb-load").addEventListener("click", async () => {
  showError("rb", null);
  try {
    const r = await api("GET", `/api/labels?root=${$("data-root").value || 0}&path=${encodeURIComponent($("rb-labels").value.trim())}`);
    $("rb-attr").replaceChildren(...r.columns.map((c) => el("option", { value: c, text: c })));
  } catch (e) { showError("rb", e); }
});
$("rb-go").addEventListener("click", async () => {
  if (!model()) { showError("rb", "fit or pick a model first"); return; }
  const res = await runJob("rb", () => api("POST", "/api/rebalance", {
    model: model(), name: $("rb-name").value.trim(), root: parseInt($("data-root").value || "0", 10),
    labels: $("rb-labels").value.trim(), attribute: $("rb-attr").value, share: parseFloat($("rb-share").value) }));
  if (!res) return;
  $("rb-result").replaceChildren(`${res.attribute}: share of faces ${res.share_before.toFixed(2)} → ${res.share_after.toFixed(2)} (asked ${res.requested}); wrote ${res.model}. `, link(res.download, "download"));
  beforeAfter("rb-ba", res); await refreshInfo();
});

refreshInfo().then(refreshRegistry).catch((e) => showError("fit", e));
