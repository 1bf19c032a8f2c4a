// orchgpu's page: uploads files, then watches each one's job by its handle, polling
// /api/uploads/<handle> until the figures are final, and shows what the function wrote:
// images inline, text inline with a copy button, anything else as a download. Operators
// (token holders) also see the recent jobs of every source. No framework; the DOM is
// built with textContent only, never from HTML strings.
"use strict";

const POLL_MS = 1000;
const RECENT_MS = 5000;
// The handles of this browser's uploads, kept across reloads (they last one daemon run).
const STORE = "orchgpu.uploads";
const KEEP = 20;
// Larger text outputs are offered as downloads only.
const TEXT_INLINE_MAX = 256 * 1024;
const WORDS = {
  uploading: "Uploading",
  uploaded: "Uploaded",
  queued: "Queued",
  received: "Picked up",
  waiting_for_gpus: "Waiting for GPUs",
  running: "Running on a GPU",
  running_elsewhere: "Running (another daemon)",
  retrying: "Failed, will retry",
  returned: "Failed, will retry",
  done: "Done",
  failed: "Failed",
  dropped: "Dropped",
  error: "Upload failed",
  gone: "No longer known",
};

let config = { uploads: false, token_required: false, authorized: true, operator: false, result_suffix: ".png", upload_max_bytes: 0, title: null, hint: null };
const watched = new Set();

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function bytes(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " MB";
  if (n >= 1e3) return (n / 1e3).toFixed(0) + " kB";
  return n + " B";
}

function stored() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(list) ? list.filter((u) => typeof u.handle === "string" && typeof u.name === "string") : [];
  } catch (_) { return []; }
}

function remember(handle, name) {
  const list = stored().filter((u) => u.handle !== handle);
  list.push({ handle, name });
  try { localStorage.setItem(STORE, JSON.stringify(list.slice(-KEEP))); } catch (_) { /* private mode */ }
}

function forget(handle) {
  try { localStorage.setItem(STORE, JSON.stringify(stored().filter((u) => u.handle !== handle))); } catch (_) { /* ignore */ }
}

async function loadConfig() {
  const r = await fetch("/api/config", { credentials: "same-origin" });
  config = await r.json();
  // Which use case this deployment serves, as its operator put it (plain text).
  if (config.title) {
    $("title").textContent = config.title;
    document.title = config.title + " · orchgpu";
  }
  if (config.hint) $("hint").textContent = config.hint;
  $("token").hidden = !(config.token_required && !config.authorized);
  const canUpload = config.uploads && config.authorized;
  $("upload").hidden = !canUpload;
  $("no-upload").hidden = config.uploads || !config.authorized;
  $("limit").textContent = "Up to " + bytes(config.upload_max_bytes) + " each.";
  $("recent-section").hidden = !config.operator;
  if (config.authorized) {
    for (const u of stored()) if (!watched.has(u.handle)) follow(makeCard(u.name), { handle: u.handle });
  }
  if (config.operator) refreshRecent();
}

async function enterToken(event) {
  event.preventDefault();
  const r = await fetch("/api/session", { method: "POST", body: $("token-input").value, credentials: "same-origin" });
  if (r.ok) {
    $("token-error").textContent = "";
    $("token-input").value = "";
    await loadConfig();
  } else {
    $("token-error").textContent = "That token is not right.";
  }
}

// One card per job: its name, state, details and, once done, the result.
function makeCard(name) {
  $("none-yet").hidden = true;
  const state = el("span", { className: "state", "data-state": "uploading", text: WORDS.uploading });
  const card = el("li", { className: "card", "data-state": "uploading", "data-seen": "uploading" },
    el("h3", { text: name }),
    state,
    el("p", { className: "summary" }),
    el("progress", { max: 100, value: 0 }),
    el("div", { className: "result" }));
  card.stateNode = state;
  $("cards").prepend(card);
  return card;
}

function setState(card, stateName, summary) {
  card.setAttribute("data-state", stateName);
  const seen = card.getAttribute("data-seen").split(" ");
  if (seen[seen.length - 1] !== stateName) {
    seen.push(stateName);
    card.setAttribute("data-seen", seen.join(" "));
  }
  card.stateNode.setAttribute("data-state", stateName);
  card.stateNode.textContent = WORDS[stateName] || stateName;
  card.querySelector(".summary").textContent = summary || "";
}

function upload(file) {
  const card = makeCard(file.name);
  if (config.upload_max_bytes && file.size > config.upload_max_bytes) {
    card.querySelector("progress").remove();
    setState(card, "error", "Too large: " + bytes(file.size) + ", the limit is " + bytes(config.upload_max_bytes) + ".");
    return;
  }
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/uploads");
  xhr.setRequestHeader("X-Filename", encodeURIComponent(file.name));
  xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
  const bar = card.querySelector("progress");
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
  xhr.onload = () => {
    bar.remove();
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* shown below */ }
    if (xhr.status === 201 && body.handle) {
      card.setAttribute("data-handle", body.handle);
      remember(body.handle, file.name);
      setState(card, "uploaded", "Uploaded " + bytes(body.bytes) + ".");
      follow(card, { handle: body.handle });
    } else if (xhr.status === 429 || xhr.status === 507) {
      setState(card, "error", "Not uploaded: " + (body.error || "orchgpu is busy") + ".");
    } else {
      setState(card, "error", body.error || "The upload failed (HTTP " + xhr.status + ").");
    }
  };
  xhr.onerror = () => { bar.remove(); setState(card, "error", "The upload did not reach orchgpu."); };
  xhr.send(file);
}

function describe(job) {
  let text = job.summary;
  if (job.state === "running" && job.seconds != null) text += " For " + job.seconds.toFixed(0) + " s.";
  if (job.state === "done" && job.final && job.seconds != null) text += " Took " + job.seconds.toFixed(1) + " s from pick-up to result.";
  // Operators only: the daemon's own details.
  if (job.scheduler_job) text += " Scheduler job " + job.scheduler_job + ".";
  if (job.owner) text += " Claimed by " + job.owner + ".";
  if (job.reason) text += " Reason: " + job.reason;
  return text;
}

// How the page shows a file with this suffix, when the server did not say (the same
// table as the server's: raster images and plain text inline, the rest downloaded).
function kindOf(suffix) {
  const ext = suffix.split(".").pop().toLowerCase();
  if (["png", "jpg", "jpeg", "gif", "webp", "bmp"].includes(ext)) return "image";
  if (["txt", "text", "tsv", "csv", "json", "md", "log"].includes(ext)) return "text";
  return "file";
}

// A text output, fetched and shown as text, with a button that copies it.
function textBlock(url, title) {
  const pre = el("pre", { className: "text", text: "Loading…" });
  const copy = el("button", { type: "button", className: "copy", text: "Copy text", disabled: true });
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(pre.textContent);
      copy.textContent = "Copied";
    } catch (_) {
      // No clipboard access (an insecure origin, a refused permission): select it instead.
      const range = document.createRange();
      range.selectNodeContents(pre);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      copy.textContent = "Selected: press Ctrl+C";
    }
  });
  fetch(url, { credentials: "same-origin" })
    .then((r) => (r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status))))
    .then((text) => {
      pre.textContent = text.trim() ? text : "(no text found)";
      copy.disabled = !text.trim();
      pre.setAttribute("data-loaded", "true");
    })
    .catch(() => { pre.textContent = "Cannot load the text."; });
  return el("div", { className: "text-output" }, el("div", { className: "text-head" }, el("span", { text: title }), copy), pre);
}

// Everything the function wrote for the job: the result first, images and text shown,
// every file also as a download link.
function showResult(card, job, ref) {
  const box = card.querySelector(".result");
  if (box.childElementCount) return;
  const base = "/results/" + (ref.handle || ref.jobId);
  const name = card.querySelector("h3").textContent;
  let outputs = job.outputs && job.outputs.length ? job.outputs.slice() : [];
  if (!outputs.length) {
    // Not listed (yet, or the listing failed): the result, and the detections if any.
    outputs.push({ suffix: config.result_suffix, kind: kindOf(config.result_suffix), bytes: 0 });
    if (job.detections && config.result_suffix !== ".txt") outputs.push({ suffix: ".txt", kind: "text", bytes: 0 });
  }
  const isResult = (o) => o.suffix === config.result_suffix;
  outputs.sort((a, b) => Number(isResult(b)) - Number(isResult(a)));
  // A detections file is shown as the list below, not as raw text.
  const detectionsFile = job.detections ? ".txt" : null;
  for (const o of outputs) {
    const url = base + o.suffix;
    if (o.kind === "image") {
      box.append(el("img", { src: url, alt: (isResult(o) ? "The result of " : "A picture made from ") + name }));
    } else if (o.kind === "text" && o.suffix !== detectionsFile && o.bytes <= TEXT_INLINE_MAX) {
      if (isResult(o)) {
        box.append(textBlock(url, "Text:"));
      } else {
        // Other text (a word table, a log) folded away under its name until asked for.
        box.append(el("details", { className: "more" }, el("summary", { text: o.suffix.slice(1) + " (" + bytes(o.bytes) + ")" }), textBlock(url, o.suffix.slice(1) + ":")));
      }
    }
  }
  if (job.detections && job.detections.length) {
    const list = el("ul", { className: "detections" });
    for (const d of job.detections) list.append(el("li", { text: d.label + " " + d.percent + "%" }));
    box.append(el("p", { text: "Found:" }), list);
  } else if (job.detections) {
    box.append(el("p", { className: "detections", text: "Nothing detected." }));
  }
  const links = el("p", { className: "links" });
  for (const o of outputs) {
    let label = "Download " + o.suffix.slice(1);
    if (o.suffix === detectionsFile) label = "Download the detections";
    else if (isResult(o) && o.kind === "image") label = "Download the image";
    else if (isResult(o) && o.kind === "text") label = "Download the text";
    links.append(el("a", { href: base + o.suffix, download: job.job_id + o.suffix, text: label }));
  }
  box.append(links);
}

// Polls a job (by the upload's handle, or by job id for operators) until what it shows
// is final.
async function follow(card, ref) {
  const key = ref.handle || ref.jobId;
  watched.add(key);
  const url = ref.handle ? "/api/uploads/" + ref.handle : "/api/jobs/" + ref.jobId;
  for (;;) {
    try {
      const r = await fetch(url, { credentials: "same-origin" });
      if (r.ok) {
        const job = await r.json();
        setState(card, job.state, describe(job));
        if (job.result) showResult(card, job, ref);
        if (job.final) { card.setAttribute("data-final", "true"); return; }
      } else if (r.status === 404 && ref.handle) {
        forget(ref.handle);
        card.querySelector("progress")?.remove();
        setState(card, "gone", "orchgpu restarted since this upload, so it no longer knows it; its result, if any, is still kept.");
        return;
      } else if (r.status === 401) {
        await loadConfig();
        return;
      }
    } catch (_) { /* the next poll tries again */ }
    await new Promise((done) => setTimeout(done, POLL_MS));
  }
}

async function refreshRecent() {
  try {
    const r = await fetch("/api/jobs", { credentials: "same-origin" });
    if (!r.ok) return;
    const body = await r.json();
    $("recent-note").textContent = body.history ? (body.jobs.length ? "" : "No jobs yet.") : "This daemon keeps no job history.";
    const rows = body.jobs.map((job) => {
      const show = el("button", { type: "button", text: "Show" });
      show.addEventListener("click", () => {
        if (watched.has(job.job_id)) return;
        follow(makeCard(job.key), { jobId: job.job_id });
      });
      const stateName = el("span", { className: "state", "data-state": job.state, text: WORDS[job.state] || job.state });
      return el("tr", { "data-job-id": job.job_id },
        el("td", { text: job.key }),
        el("td", {}, stateName, job.reason ? el("div", { className: "hint", text: job.reason }) : null),
        el("td", { text: job.last_update.replace("T", " ").replace(/\.\d+Z$/, "") }),
        el("td", {}, el("code", { text: job.job_id }), document.createTextNode(" "), show));
    });
    $("recent").querySelector("tbody").replaceChildren(...rows);
  } catch (_) { /* tried again shortly */ }
}

function setup() {
  $("token-form").addEventListener("submit", enterToken);
  $("files").addEventListener("change", (e) => { for (const f of e.target.files) upload(f); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    for (const f of e.dataTransfer.files) upload(f);
  });
  loadConfig();
  setInterval(() => { if (config.operator) refreshRecent(); }, RECENT_MS);
}

document.addEventListener("DOMContentLoaded", setup);
