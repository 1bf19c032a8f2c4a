// orchgpu's page: uploads images, then watches each one's job by its handle, polling
// /api/uploads/<handle> until the figures are final. Operators (token holders) also see
// the recent jobs of every source. No framework; the DOM is built with textContent only,
// never from HTML strings.
"use strict";

const POLL_MS = 1000;
const RECENT_MS = 5000;
// The handles of this browser's uploads, kept across reloads (they last one daemon run).
const STORE = "orchgpu.uploads";
const KEEP = 20;
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

let config = { uploads: false, token_required: false, authorized: true, operator: false, result_suffix: ".png", upload_max_bytes: 0 };
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

function showResult(card, job, ref) {
  const box = card.querySelector(".result");
  if (box.childElementCount) return;
  const base = "/results/" + (ref.handle || ref.jobId);
  const png = base + config.result_suffix;
  const txt = base + ".txt";
  box.append(el("img", { src: png, alt: "The annotated result of " + card.querySelector("h3").textContent }));
  if (job.detections && job.detections.length) {
    const list = el("ul", { className: "detections" });
    for (const d of job.detections) list.append(el("li", { text: d.label + " " + d.percent + "%" }));
    box.append(el("p", { text: "Found:" }), list);
  } else if (job.detections) {
    box.append(el("p", { className: "detections", text: "Nothing detected." }));
  }
  const links = el("p", { className: "links" },
    el("a", { href: png, download: job.job_id + config.result_suffix, text: "Download the image" }));
  if (job.detections) links.append(el("a", { href: txt, download: job.job_id + ".txt", text: "Download the detections" }));
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
