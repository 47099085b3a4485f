/* LPMOS console.  Plain JavaScript, no build step.
 *
 * Rules: every value that came from a machine or a user is written with
 * textContent or setAttribute (never innerHTML); lists come from the REST
 * API (served from the control plane's watch cache) and are kept live by
 * /ws deltas; a reconnect resumes from the last revision seen. */
"use strict";
(function () {
  const I = window.LPMOS_I18N;
  const t = I.t;
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const CSRF = meta("csrf-token");
  const ME = { user: meta("lpmos-user"), role: meta("lpmos-role") };
  const RANK = { viewer: 1, operator: 2, approver: 3, admin: 4 };
  const can = (role) => (RANK[ME.role] || 0) >= RANK[role];
  const STATES = ["pending", "approved", "booting", "installing", "succeeded", "failed",
    "rejected", "cancelled", "releasing", "released"];
  const ACTIVE = new Set(["pending", "approved", "booting", "installing", "releasing"]);
  // states whose schedule an approver may still change (web/api_tasks.py SCHEDULABLE)
  const SCHEDULABLE = new Set(["pending", "approved", "succeeded", "failed"]);

  // ---- DOM helpers ------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = String(v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const svgNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = String(v); else node.setAttribute(k, String(v));
    }
    for (const child of children.flat(Infinity)) if (child) node.append(child);
    return node;
  }
  function appendAll(node, ...items) {
    for (const c of items.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function fmtTime(ts) {
    if (!ts) return "—";
    const d = new Date(ts * 1000);
    return d.toLocaleString(I.lang === "zh" ? "zh-CN" : undefined, { hour12: false });
  }
  function fmtAgo(ts) {
    if (!ts) return "—";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)}s`;
    if (s < 3600) return `${Math.round(s / 60)}m`;
    if (s < 86400) return `${Math.round(s / 3600)}h`;
    return `${Math.round(s / 86400)}d`;
  }
  function fmtBytes(n) {
    if (n === null || n === undefined || n === "") return "—";
    const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0; let v = Number(n);
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return `${v.toFixed(v >= 10 || i === 0 ? 0 : 1)} ${u[i]}`;
  }
  function fmtDuration(s) {
    if (s === null || s === undefined) return "—";
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }
  function badge(status) {
    return el("span", { class: `badge s-${status}`, "data-status": status, text: t(`status.${status}`) });
  }
  function toast(message, kind) {
    const node = el("div", { class: `toast ${kind || ""}`, role: "status", text: message });
    document.getElementById("toasts").append(node);
    setTimeout(() => node.remove(), kind === "error" ? 8000 : 4000);
  }

  // ---- API ----------------------------------------------------------------------
  class ApiFailure extends Error {
    constructor(status, body) {
      super((body && body.detail) || `HTTP ${status}`);
      this.status = status; this.body = body || {};
    }
  }
  async function api(method, path, body, extraHeaders) {
    const headers = Object.assign({ "Accept": "application/json" }, extraHeaders || {});
    const init = { method, headers, credentials: "same-origin" };
    if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
    if (body !== undefined) {
      if (typeof body === "string") init.body = body;
      else { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    }
    let resp;
    try { resp = await fetch(path, init); } catch (e) { throw new ApiFailure(0, { detail: t("err.network") }); }
    if (resp.status === 401) { location.href = "/login"; throw new ApiFailure(401, {}); }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) throw new ApiFailure(resp.status, data);
    return data;
  }
  function showError(err) {
    if (err.status === 403 && err.body.error === "forbidden") toast(t("err.forbidden"), "error");
    else if (err.status === 409) toast(`${t("err.conflict")} (${err.body.detail || ""})`, "error");
    else toast(`${t("err.generic")}: ${err.message}`, "error");
  }
  const qs = (params) => {
    const u = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) u.set(k, v);
    const s = u.toString();
    return s ? `?${s}` : "";
  };

  // ---- shared state ---------------------------------------------------------------
  const state = {
    view: "tasks",
    idcs: [],
    catalog: [],
    templates: [],
    rev: 0,
    tasks: new Map(),          // "idc/sn" -> summary
    taskRows: new Map(),       // "idc/sn" -> <tr>
    taskFilters: { idc: "", status: "", q: "" },
    taskCursor: null,
    servers: new Map(),
    serverRows: new Map(),
    drawer: null,              // {kind: "task"|"server", idc, sn}
  };

  // ---- modal ------------------------------------------------------------------------
  function confirmDialog({ title, warn, withNotes, confirmClass, confirmText }) {
    return new Promise((resolve) => {
      const box = clear(document.getElementById("modal-box"));
      const backdrop = document.getElementById("modal");
      const notes = withNotes ? el("textarea", { id: "modal-notes", maxlength: "1000", placeholder: t("approve.notes") }) : null;
      const close = (value) => { backdrop.classList.add("hidden"); resolve(value); };
      box.append(
        el("h3", { text: title }),
        warn ? el("p", { class: "warn", text: warn }) : null,
        notes ? el("label", {}, t("approve.notes"), notes) : null,
        el("div", { class: "actions" },
          el("button", { class: "btn", type: "button", onclick: () => close(null), text: t("common.cancel") }),
          el("button", { class: `btn ${confirmClass || "btn-primary"}`, id: "modal-confirm", type: "button",
            onclick: () => close({ notes: notes ? notes.value : "" }), text: confirmText || t("act.confirm") })));
      backdrop.classList.remove("hidden");
      (notes || box.querySelector("#modal-confirm")).focus();
    });
  }

  // ---- task actions -------------------------------------------------------------------
  async function taskAction(task, action) {
    const name = `${task.idc}/${task.sn}`;
    const spec = {
      approve: { title: t("approve.title", { t: name }), warn: t("approve.warn"), notes: true, cls: "btn-ok" },
      reject: { title: t("reject.title", { t: name }), notes: true, cls: "btn-danger" },
      cancel: { title: t("cancel.title", { t: name }), notes: true, cls: "btn-danger" },
      retry: { title: t("retry.title", { t: name }), warn: t("approve.warn"), notes: true, cls: "btn-ok" },
      release: { title: t("release.title", { t: name }), warn: t("release.warn"), notes: true, cls: "btn-danger" },
      delete: { title: t("delete.title", { t: name }), notes: false, cls: "btn-danger" },
    }[action];
    const answer = await confirmDialog({ title: spec.title, warn: spec.warn, withNotes: spec.notes,
      confirmClass: spec.cls, confirmText: t(`act.${action}`) });
    if (!answer) return;
    const path = `/api/v1/tasks/${encodeURIComponent(task.idc)}/${encodeURIComponent(task.sn)}`;
    try {
      if (action === "delete") await api("DELETE", `${path}${qs({ revision: task.revision })}`);
      else {
        const body = { revision: task.revision };
        body[action === "cancel" ? "reason" : "notes"] = answer.notes;
        const res = await api("POST", `${path}/${action}`, body);
        if (res && res.task) applyTaskFull(res.task, res.revision);
      }
      toast(t(`done.${action}`, { t: name }), "ok");
    } catch (err) { showError(err); }
  }

  function taskButtons(task) {
    const box = el("div", { class: "actions" });
    const add = (action, role, cls) => {
      if (!can(role)) return;
      box.append(el("button", { class: `btn btn-sm ${cls || ""}`, type: "button", "data-action": action,
        onclick: (ev) => { ev.stopPropagation(); taskAction(state.tasks.get(`${task.idc}/${task.sn}`) || task, action); },
        text: t(`act.${action}`) }));
    };
    if (task.status === "pending") { add("approve", "approver", "btn-ok"); add("reject", "approver", "btn-danger"); }
    if (task.status === "failed") add("retry", "approver", "btn-ok");
    if (task.status === "succeeded" || task.status === "failed") add("release", "approver", "btn-danger");
    if (ACTIVE.has(task.status)) add("cancel", "operator", "btn-danger");
    if (!ACTIVE.has(task.status) || task.status === "pending" || task.status === "approved") {
      if (!ACTIVE.has(task.status)) add("delete", "operator", "btn-danger");
    }
    return box;
  }

  function progressCell(task) {
    const p = task.progress || {};
    const pct = Math.max(0, Math.min(100, Number(p.percent) || 0));
    const bar = el("div", { class: "bar" });
    bar.style.width = `${pct}%`;
    const wrap = el("div", { class: `progress ${task.status === "succeeded" ? "done" : ""} ${task.status === "failed" ? "failed" : ""}`,
      role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(Math.round(pct)),
      "data-percent": String(pct) }, bar);
    const label = el("div", { class: "progress-label" },
      el("span", { class: "step", text: p.step || "" }),
      el("span", { class: "pct", text: `${Math.round(pct)}%` }));
    const tail = (task.log_tail || []).slice(-1)[0] || p.message || "";
    return el("div", { class: "progress-cell" }, wrap, label,
      tail ? el("div", { class: "logtail mono", title: tail, text: tail }) : null);
  }

  function taskRow(task) {
    const key = `${task.idc}/${task.sn}`;
    const tr = el("tr", { class: "clickable", "data-key": key, "data-sn": task.sn, "data-status": task.status,
      onclick: () => openTask(task.idc, task.sn) },
      el("td", { text: task.idc }),
      el("td", { class: "mono sn", text: task.sn }),
      el("td", { class: "mono", text: task.mac }),
      el("td", {}, el("div", { text: task.os_type }), el("div", { class: "muted", text: task.os_version || task.image || "" })),
      el("td", {}, badge(task.status), scheduleNote(task)),
      el("td", {}, progressCell(task)),
      el("td", { class: "muted", title: fmtTime(task.updated_at), text: fmtAgo(task.updated_at) }),
      el("td", { class: "muted", text: task.created_by || "" }),
      el("td", {}, taskButtons(task)));
    return tr;
  }

  function matchesFilters(task) {
    const f = state.taskFilters;
    if (f.idc && task.idc !== f.idc) return false;
    if (f.status && task.status !== f.status) return false;
    if (f.q) {
      const hay = [task.idc, task.sn, task.mac, task.os_type, task.os_version, task.image,
        task.created_by, task.approved_by, task.template, task.notes, task.status].join(" ").toLowerCase();
      if (!hay.includes(f.q.toLowerCase())) return false;
    }
    return true;
  }

  // ---- tasks view -------------------------------------------------------------------
  let tasksBody = null;
  let tasksCount = null;
  let tasksMore = null;

  function renderTasksView() {
    const root = clear(document.getElementById("view-tasks"));
    const idcSel = el("select", { id: "filter-idc", "aria-label": t("tasks.filter.idc") },
      el("option", { value: "", text: `${t("tasks.filter.idc")}: ${t("common.all")}` }),
      state.idcs.map((i) => el("option", { value: i.name, text: i.name })));
    idcSel.value = state.taskFilters.idc;
    const stSel = el("select", { id: "filter-status", "aria-label": t("tasks.filter.status") },
      el("option", { value: "", text: `${t("tasks.filter.status")}: ${t("common.all")}` }),
      STATES.map((s) => el("option", { value: s, text: t(`status.${s}`) })));
    stSel.value = state.taskFilters.status;
    const search = el("input", { id: "filter-q", type: "search", placeholder: t("tasks.filter.q"), value: state.taskFilters.q, maxlength: "200" });
    let timer = null;
    const refilter = () => {
      state.taskFilters = { idc: idcSel.value, status: stSel.value, q: search.value.trim() };
      loadTasks(false);
    };
    idcSel.addEventListener("change", refilter);
    stSel.addEventListener("change", refilter);
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refilter, 250); });
    const createPanel = el("div", { class: "panel hidden", id: "create-panel" });
    const toolbar = el("div", { class: "toolbar" },
      can("operator") ? el("button", { class: "btn btn-primary", id: "btn-new-task", type: "button",
        onclick: () => toggleCreate(), text: t("tasks.new") }) : null,
      idcSel, stSel, search, el("span", { class: "spacer" }),
      (tasksCount = el("span", { class: "count", id: "tasks-count" })));
    tasksBody = el("tbody", { id: "tasks-body" });
    tasksMore = el("button", { class: "btn hidden", id: "tasks-more", type: "button", onclick: () => loadTasks(true), text: t("common.more") });
    root.append(toolbar, createPanel,
      el("div", { class: "panel" },
        el("table", { id: "tasks-table" },
          el("thead", {}, el("tr", {}, ["col.idc", "col.sn", "col.mac", "col.os", "col.status",
            "col.progress", "col.updated", "col.created_by", "col.actions"].map((k) => el("th", { text: t(k) })))),
          tasksBody),
        el("div", { class: "toolbar" }, tasksMore)));
  }

  function toggleCreate(prefill) {
    const panel = document.getElementById("create-panel");
    if (!panel) return;
    if (!prefill && !panel.classList.contains("hidden")) { panel.classList.add("hidden"); return; }
    clear(panel);
    const idc = el("select", { name: "idc", id: "new-idc", required: true },
      state.idcs.map((i) => el("option", { value: i.name, text: `${i.name} (${i.nodes_alive} ${t("idc.nodes")})` })));
    const idcFree = el("input", { name: "idc_text", id: "new-idc-text", placeholder: "dc1", maxlength: "32" });
    const sn = el("input", { name: "sn", id: "new-sn", required: true, maxlength: "64", placeholder: "SN-0001" });
    const mac = el("input", { name: "mac", id: "new-mac", required: true, maxlength: "17", placeholder: "00:1a:2b:3c:4d:5e" });
    const os = state.catalog.length
      ? el("select", { name: "os_type", id: "new-os" }, state.catalog.map((img) =>
        el("option", { value: img.os_type, "data-version": img.version, "data-image": img.name, text: `${img.os_type} — ${img.name}` })))
      : el("input", { name: "os_type", id: "new-os", maxlength: "64", placeholder: "Ubuntu 22.04" });
    const version = el("input", { name: "os_version", id: "new-os-version", maxlength: "32" });
    const template = el("select", { name: "template", id: "new-template" },
      el("option", { value: "", text: t("form.none") }),
      state.templates.map((tp) => el("option", { value: tp.name, text: `${tp.name} — ${tp.os_type}` })));
    const notes = el("input", { name: "notes", id: "new-notes", maxlength: "1000" });
    // Install inputs (docs/install-inputs.md).  The password hash is a secret:
    // sent, never shown again (the API answers "<set>").
    const hostname = el("input", { name: "hostname", id: "new-hostname", maxlength: "253", placeholder: "web-01.example.com" });
    const sshKeys = el("textarea", { name: "ssh_keys", id: "new-ssh-keys", class: "mono", rows: "3", placeholder: t("form.ssh_keys_hint") });
    const passwordHash = el("input", { name: "password_hash", id: "new-password-hash", type: "password", autocomplete: "off", maxlength: "200", placeholder: "$6$…  (openssl passwd -6)" });
    const cloudConfig = el("textarea", { name: "cloud_config", id: "new-cloud-config", class: "mono", rows: "4", placeholder: "#cloud-config\npackages: [htop]" });
    const network = el("textarea", { name: "network", id: "new-network", class: "mono", rows: "3", placeholder: '{"mode": "static", "addresses": ["192.0.2.10/24"], "gateway4": "192.0.2.1", "dns": {"servers": ["192.0.2.53"]}}' });
    if (os.tagName === "SELECT") {
      const sync = () => { const o = os.selectedOptions[0]; if (o) version.value = o.getAttribute("data-version") || ""; };
      os.addEventListener("change", sync); sync();
    }
    template.addEventListener("change", () => {
      const tp = state.templates.find((x) => x.name === template.value);
      if (!tp) return;
      os.value = tp.os_type; version.value = tp.os_version || "";
    });
    if (prefill) {
      if (state.idcs.some((i) => i.name === prefill.idc)) idc.value = prefill.idc; else idcFree.value = prefill.idc;
      sn.value = prefill.sn || ""; mac.value = prefill.mac || "";
    }
    const form = el("form", { class: "form-grid", id: "create-form" },
      el("label", {}, t("form.idc"), state.idcs.length ? idc : idcFree),
      el("label", {}, t("form.sn"), sn), el("label", {}, t("form.mac"), mac),
      el("label", {}, t("form.template"), template),
      el("label", {}, t("form.os"), os), el("label", {}, t("form.os_version"), version),
      el("label", {}, t("form.hostname"), hostname),
      el("label", {}, t("form.password_hash"), passwordHash),
      el("label", { class: "wide" }, t("form.ssh_keys"), sshKeys),
      el("label", { class: "wide" }, t("form.cloud_config"), cloudConfig),
      el("label", { class: "wide" }, t("form.network"), network),
      el("label", { class: "wide" }, t("form.notes"), notes),
      el("div", { class: "actions" },
        el("button", { class: "btn btn-primary", type: "submit", id: "create-submit", text: t("form.create") }),
        el("button", { class: "btn", type: "button", onclick: () => panel.classList.add("hidden"), text: t("common.cancel") })));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = { idc: state.idcs.length ? idc.value : idcFree.value.trim(), sn: sn.value.trim(), mac: mac.value.trim(),
        os_type: os.value, os_version: version.value.trim(), notes: notes.value };
      if (template.value) body.template = template.value;
      if (os.tagName === "SELECT" && os.selectedOptions[0] && !template.value) body.image = os.selectedOptions[0].getAttribute("data-image");
      const params = {};
      if (hostname.value.trim()) params.hostname = hostname.value.trim();
      const keys = sshKeys.value.split("\n").map((k) => k.trim()).filter(Boolean);
      if (keys.length) params.ssh_keys = keys;
      if (passwordHash.value.trim()) params.password_hash = passwordHash.value.trim();
      if (cloudConfig.value.trim()) params.cloud_config = cloudConfig.value.replace(/\r\n/g, "\n");
      if (network.value.trim()) {
        try { params.network = JSON.parse(network.value); } catch (e) { toast(`network: ${e.message}`, "error"); return; }
      }
      if (Object.keys(params).length) body.params = params;
      try {
        const res = await api("POST", "/api/v1/tasks", body);
        passwordHash.value = "";
        applyTaskFull(res.task, res.revision);
        toast(t("form.created", { t: `${body.idc}/${body.sn}` }), "ok");
        panel.classList.add("hidden");
      } catch (err) { showError(err); }
    });
    panel.append(el("h3", { text: t("tasks.new") }), form);
    panel.classList.remove("hidden");
    sn.focus();
  }

  // A first page is a snapshot of the control plane's cache at data.revision.
  // Deltas that arrive over /ws while it is in flight are applied at once and
  // also kept; once the snapshot has replaced the table, those newer than it
  // are applied again, so a change made during the request is never lost.  A
  // load superseded by a later one (a view switch, then the hello resync) is
  // dropped: only the newest snapshot replaces the table.
  const snapshots = { tasks: { seq: 0, buffer: null }, servers: { seq: 0, buffer: null } };
  function beginSnapshot(kind) {
    const s = snapshots[kind]; s.seq += 1; s.buffer = []; return s.seq;
  }
  function isCurrentSnapshot(kind, seq) { return snapshots[kind].seq === seq; }
  function keepDelta(kind, msg) { const s = snapshots[kind]; if (s.buffer) s.buffer.push(msg); }
  function endSnapshot(kind, revision, apply) {
    const s = snapshots[kind]; const kept = s.buffer || []; s.buffer = null;
    for (const msg of kept) if (typeof msg.rev !== "number" || typeof revision !== "number" || msg.rev > revision) apply(msg);
  }

  async function loadTasks(more) {
    if (!tasksBody) return;
    const f = state.taskFilters;
    const seq = more ? 0 : beginSnapshot("tasks");
    try {
      const data = await api("GET", `/api/v1/tasks${qs({ idc: f.idc, status: f.status, q: f.q, limit: 50, cursor: more ? state.taskCursor : "" })}`);
      if (!more && !isCurrentSnapshot("tasks", seq)) return;
      if (!more) { clear(tasksBody); state.tasks.clear(); state.taskRows.clear(); }
      for (const task of data.items) putTaskRow(task, false);
      if (!more) endSnapshot("tasks", data.revision, applyTaskDelta);
      state.taskCursor = data.next_cursor;
      tasksMore.classList.toggle("hidden", !data.next_cursor);
      tasksCount.textContent = data.total !== null && data.total !== undefined ? t("tasks.count", { n: data.total }) : "";
      if (!tasksBody.firstChild) tasksBody.append(el("tr", { class: "empty-row" }, el("td", { colspan: "9", class: "empty", text: t("common.none") })));
    } catch (err) {
      if (!more && isCurrentSnapshot("tasks", seq)) snapshots.tasks.buffer = null;
      if (err.status) showError(err);
    }
  }

  function putTaskRow(task, prepend) {
    const key = `${task.idc}/${task.sn}`;
    state.tasks.set(key, task);
    const row = taskRow(task);
    const old = state.taskRows.get(key);
    if (old) old.replaceWith(row);
    else {
      const empty = tasksBody.querySelector(".empty-row");
      if (empty) empty.remove();
      if (prepend) tasksBody.prepend(row); else tasksBody.append(row);
    }
    state.taskRows.set(key, row);
    return row;
  }

  function summaryFromFull(task, revision) {
    return Object.assign({}, task, { revision, log_tail: (task.logs || []).slice(-5) });
  }
  function applyTaskFull(task, revision) {
    applyTaskDelta({ op: "put", idc: task.idc, sn: task.sn, task: summaryFromFull(task, revision) });
  }

  function applyTaskDelta(msg) {
    const key = `${msg.idc}/${msg.sn}`;
    const current = state.tasks.get(key);
    if (msg.op === "del") {
      state.tasks.delete(key);
      const row = state.taskRows.get(key);
      if (row) row.remove();
      state.taskRows.delete(key);
    } else if (tasksBody) {
      let merged = null;
      if (current) {
        if ((msg.task.revision || 0) <= (current.revision || 0)) return;
        merged = Object.assign({}, current, msg.task);
      } else if (msg.task.status && msg.task.mac) {
        merged = msg.task;
      }
      if (merged) {
        if (current || matchesFilters(merged)) {
          if (!current && !matchesFilters(merged)) return;
          const row = putTaskRow(merged, !current);
          row.classList.add("flash");
        }
      }
    }
    if (state.drawer && state.drawer.kind === "task" && state.drawer.idc === msg.idc && state.drawer.sn === msg.sn) {
      openTask(msg.idc, msg.sn, true);
    }
  }

  // ---- task drawer ---------------------------------------------------------------------
  let drawerSeq = 0;
  function openDrawer(title) {
    document.getElementById("drawer-title").textContent = title;
    document.getElementById("drawer").classList.remove("hidden");
    return clear(document.getElementById("drawer-body"));
  }
  function kv(pairs) {
    return el("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) => [el("dt", { text: k }),
      el("dd", {}, v instanceof Node ? v : String(v === null || v === undefined || v === "" ? "—" : v))]));
  }
  // The install inputs a task drawer shows; the API has already redacted the
  // secrets (password_hash is "<set>"), and the cloud-config is shown as text.
  function installInputs(p) {
    const net = p.network && typeof p.network === "object" ? p.network : null;
    return [
      p.hostname ? [t("form.hostname"), p.hostname] : null,
      Array.isArray(p.ssh_keys) && p.ssh_keys.length ? [t("form.ssh_keys"), el("pre", { class: "mono", text: p.ssh_keys.join("\n") })] : null,
      p.password_hash ? [t("form.password_hash"), String(p.password_hash)] : null,
      net ? [t("form.network"), el("pre", { class: "mono", text: JSON.stringify(net, null, 1) })] : null,
      p.cloud_config ? [t("form.cloud_config"), el("pre", { class: "mono", text: String(p.cloud_config) })] : null,
    ];
  }
  // ---- schedule (issue #21): shown on the row and in the drawer, changed by an approver
  function isoOf(stamp) {
    return stamp ? new Date(stamp * 1000).toISOString().replace(/\.\d{3}Z$/, "Z") : "";
  }
  function scheduleNote(task) {
    if (!task.not_before && !task.window) return null;
    const parts = [];
    if (task.not_before) parts.push(`≥ ${isoOf(task.not_before)}`);
    if (task.window) parts.push(`${task.window} UTC`);
    return el("div", { class: "muted schedule-note", "data-schedule": parts.join(" "), text: parts.join(" · ") });
  }
  function scheduleSection(task, revision) {
    const s = task.schedule || {};
    const rows = [[t("schedule.section"), s.summary || t("schedule.none")]];
    if (s.waiting) rows.push([t("schedule.waiting"), s.reason]);
    else if (s.starts_at) rows.push([t("schedule.starts_at"), s.starts_at]);
    const out = [el("div", { class: "section", text: t("schedule.section") }),
      el("div", { id: "task-schedule" }, kv(rows))];
    if (can("approver") && SCHEDULABLE.has(task.status)) {
      const nb = el("input", { id: "schedule-not-before", type: "text", maxlength: "40", value: s.not_before || "",
        placeholder: "2026-12-04T22:00:00Z" });
      const win = el("input", { id: "schedule-window", type: "text", maxlength: "20", value: s.window || "",
        placeholder: "22:00-04:00" });
      const errorBox = el("div", { id: "schedule-error", class: "drawer-error hidden", role: "alert" });
      const save = async () => {
        hideError(errorBox);
        const path = `/api/v1/tasks/${encodeURIComponent(task.idc)}/${encodeURIComponent(task.sn)}/schedule`;
        try {
          const res = await api("PUT", path, { not_before: nb.value.trim() || null,
            window: win.value.trim() || null, revision });
          if (res && res.task) applyTaskFull(res.task, res.revision);
          toast(t("schedule.saved", { t: `${task.idc}/${task.sn}` }), "ok");
          openTask(task.idc, task.sn, true);
        } catch (err) { showErrorIn(errorBox, err); }
      };
      out.push(errorBox, el("form", { id: "schedule-form", class: "form-grid", onsubmit: (ev) => { ev.preventDefault(); save(); } },
        el("label", {}, t("schedule.not_before"), nb), el("label", {}, t("schedule.window"), win),
        el("button", { class: "btn btn-sm", type: "submit", id: "schedule-save", text: t("schedule.save") })));
    }
    return out;
  }
  // ---- BMC and power (issue #21): the record (never a password: the API
  // returns none, only has_password), the newest power requests and their
  // results, power buttons for operators, the record's form for admins.
  // The API's roles (web/api_power.py): viewer reads, operator queues power
  // requests, admin sets or clears the record.
  const POWER_ACTIONS = [["on", t("power.on")], ["off", t("power.off")], ["cycle", t("power.cycle")],
    ["pxe-once", t("power.pxe_once")], ["status", t("power.status")]];
  const POWER_CONFIRM = new Set(["off", "cycle"]);
  const POWER_REQ_STATES = { queued: t("power.req.queued"), claimed: t("power.req.claimed"),
    done: t("power.req.done"), failed: t("power.req.failed") };
  const POWER_POLL_MS = 1500;
  const POWER_POLLS = 240;           // 6 min: longer than a request's queue TTL and deadline
  function apiErrorText(err) {
    const b = err.body || {};
    const field = b.field ? ` [${b.field}]` : "";
    if (err.status === 403 && b.error === "forbidden") return t("err.forbidden");
    return `${t("err.generic")} (HTTP ${err.status || "—"}${b.error ? ` ${b.error}` : ""})${field}: ${err.message}`;
  }
  // an API refusal written into a box of the drawer (and kept there until the next action)
  function showErrorIn(box, err) {
    clear(box).classList.remove("hidden");
    box.append(el("strong", { text: t("power.error") }), " ", el("span", { class: "detail", text: apiErrorText(err) }));
  }
  function hideError(box) { clear(box).classList.add("hidden"); }
  function bmcRows(data) {
    const b = data.bmc;
    if (!b) return [[t("bmc.record"), t("bmc.none")], data.inventory_address ? [t("bmc.inventory_address"), data.inventory_address] : null];
    return [[t("bmc.driver"), b.driver], [t("bmc.address"), b.address], [t("bmc.endpoint"), b.endpoint],
      (b.options || {}).system ? [t("bmc.system"), b.options.system] : null, [t("bmc.user"), b.user],
      [t("bmc.password"), el("span", { id: "bmc-has-password", "data-set": b.has_password ? "yes" : "no",
        text: b.has_password ? t("bmc.password_set") : t("bmc.password_unset") })],
      [t("bmc.source"), b.source], [t("bmc.updated"), `${b.updated_by || "—"} · ${fmtTime(b.updated_at)}`]];
  }
  function powerRequestRows(r) {
    if (!r) return [[t("power.last"), t("power.none")]];
    return [[t("power.last"), el("span", { id: "power-last", "data-id": r.id, "data-state": r.state, text: r.describe })],
      [t("power.action"), `${r.action} (${(r.steps || []).map((s) => `${s.name}: ${s.state}`).join(", ")})`],
      [t("power.state"), el("span", { class: `badge p-${r.state}`, id: "power-last-state", text: POWER_REQ_STATES[r.state] || r.state })],
      [t("power.asked"), `${r.created_by || "—"} · ${fmtTime(r.created_at)} · ${r.reason || ""}`],
      r.not_before || r.window ? [t("power.waits_for"), scheduleNote(r)] : null,
      [t("power.node"), r.node || "—"],
      [t("power.read_back"), el("span", { id: "power-read-back", text: r.power_state || "—" })],
      r.boot_override ? [t("power.boot_override"), r.boot_override] : null,
      r.error ? [t("power.bmc_error"), el("span", { id: "power-bmc-error", class: "bad", "data-kind": r.error_kind || "",
        text: `${r.error_kind ? `${r.error_kind}: ` : ""}${r.error}` })] : null,
      r.tries ? [t("power.tries"), r.tries] : null,
      r.finished_at ? [t("power.finished"), fmtTime(r.finished_at)] : null];
  }
  // the power section on screen: a live update may rebuild the drawer while
  // an action is in flight, and its answer then goes to the section shown
  let powerView = null;
  // what an admin typed into the BMC form and has not saved: a live update
  // rebuilds the drawer (the task drawer on every progress event), and the
  // form comes back as it was; forgotten on save, clear or closing the drawer
  let bmcDraft = null;
  function powerHistory(items) {
    if (!items.length) return null;
    return [el("div", { class: "muted", text: t("power.earlier") }),
      el("table", { id: "power-history" }, el("tbody", {}, items.map((r) => el("tr", { "data-id": r.id, "data-state": r.state },
        el("td", { class: "muted", text: fmtTime(r.created_at) }), el("td", { text: r.created_by || "—" }),
        el("td", {}, el("span", { class: `badge p-${r.state}`, text: POWER_REQ_STATES[r.state] || r.state })),
        el("td", { text: r.describe })))))];
  }
  function powerSection(idc, sn) {
    const path = `/api/v1/servers/${encodeURIComponent(idc)}/${encodeURIComponent(sn)}`;
    const seq = drawerSeq;
    const errorBox = el("div", { id: "power-error", class: "drawer-error hidden", role: "alert" });
    const status = el("div", { id: "power-status" }, el("p", { class: "muted", text: t("common.loading") }));
    const buttons = el("div", { class: "actions", id: "power-actions" });
    const formBox = el("div", { id: "bmc-form-box" });
    let polls = 0; let timer = null; let loads = 0;
    const shown = () => (powerView && powerView.seq === drawerSeq ? powerView : { refresh: () => {}, errorBox });
    async function refresh(rebuildForm) {
      clearTimeout(timer);
      const load = ++loads;          // only the newest answer is shown
      let bmc; let list;
      try {
        [bmc, list] = await Promise.all([api("GET", `${path}/bmc`), api("GET", `${path}/power?limit=5`)]);
      } catch (err) { if (seq === drawerSeq && load === loads) showErrorIn(errorBox, err); return; }
      if (seq !== drawerSeq || load !== loads) return;
      const last = list.items[0] || null;
      appendAll(clear(status), kv(bmcRows(bmc)), kv(powerRequestRows(last)), powerHistory(list.items.slice(1)));
      clear(buttons);
      if (can("operator") && bmc.bmc) {
        for (const [action, label] of POWER_ACTIONS) {
          buttons.append(el("button", { class: `btn btn-sm ${POWER_CONFIRM.has(action) ? "btn-danger" : ""}`, type: "button",
            "data-power": action, onclick: () => power(action), text: label }));
        }
      }
      if (rebuildForm && can("admin")) appendAll(clear(formBox), bmcForm(bmc));
      if (last && !["done", "failed"].includes(last.state) && polls++ < POWER_POLLS) timer = setTimeout(() => refresh(false), POWER_POLL_MS);
    }
    async function power(action) {
      let reason = "";
      if (POWER_CONFIRM.has(action)) {
        const answer = await confirmDialog({ title: t("power.confirm", { a: action, t: `${idc}/${sn}` }), warn: t("power.confirm_warn"),
          withNotes: true, confirmClass: "btn-danger", confirmText: t("act.confirm") });
        if (!answer) return;
        reason = answer.notes.trim();
      }
      hideError(shown().errorBox);
      try {
        await api("POST", `${path}/power`, reason ? { action, reason } : { action });
        toast(t("power.queued", { a: action, t: `${idc}/${sn}` }), "ok");
        shown().refresh(false);
      } catch (err) { showErrorIn(shown().errorBox, err); }
    }
    function bmcForm(data) {
      const b = data.bmc || {};
      const opts = b.options || {};
      const driver = el("select", { id: "bmc-driver" }, ["redfish", "ipmi"].map((v) => el("option", { value: v, text: v })));
      driver.value = b.driver || "redfish";
      const address = el("input", { id: "bmc-address", maxlength: "253", value: b.address || "",
        placeholder: data.inventory_address || "10.0.0.10" });
      const port = el("input", { id: "bmc-port", type: "number", min: "0", max: "65535", value: b.port ? String(b.port) : "",
        placeholder: t("bmc.port_default") });
      const user = el("input", { id: "bmc-user", maxlength: "64", value: b.user || "", autocomplete: "off" });
      // write-only: never filled in, emptied after each save; empty keeps the stored one
      const password = el("input", { id: "bmc-password", type: "password", maxlength: "128", autocomplete: "new-password",
        placeholder: b.has_password ? t("bmc.password_keep") : "" });
      const scheme = el("select", { id: "bmc-scheme" }, ["https", "http"].map((v) => el("option", { value: v, text: v })));
      scheme.value = opts.scheme || "https";
      const verify = el("input", { id: "bmc-verify-tls", type: "checkbox", checked: opts.verify_tls !== false });
      const system = el("input", { id: "bmc-system", maxlength: "160", value: opts.system || "", placeholder: t("bmc.system_hint") });
      const redfishOnly = [el("label", {}, t("bmc.scheme"), scheme), el("label", {}, t("bmc.system"), system),
        el("label", { class: "inline" }, verify, ` ${t("bmc.verify_tls")}`)];
      const fields = { driver, address, port, user, password, scheme, system };
      if (bmcDraft && bmcDraft.key === `${idc}/${sn}`) {
        for (const [name, node] of Object.entries(fields)) node.value = bmcDraft.values[name];
        verify.checked = bmcDraft.values.verify;
      } else bmcDraft = null;
      const keepDraft = () => {
        const values = { verify: verify.checked };
        for (const [name, node] of Object.entries(fields)) values[name] = node.value;
        bmcDraft = { key: `${idc}/${sn}`, values };
      };
      const syncDriver = () => redfishOnly.forEach((n) => n.classList.toggle("hidden", driver.value !== "redfish"));
      driver.addEventListener("change", syncDriver); syncDriver();
      const form = el("form", { id: "bmc-form", class: "form-grid" },
        el("label", {}, t("bmc.driver"), driver), el("label", {}, t("bmc.address"), address),
        el("label", {}, t("bmc.port"), port), el("label", {}, t("bmc.user"), user),
        el("label", {}, t("bmc.password"), password), redfishOnly,
        el("div", { class: "actions wide" },
          el("button", { class: "btn btn-sm btn-primary", type: "submit", id: "bmc-save", text: t("bmc.save") }),
          data.bmc ? el("button", { class: "btn btn-sm btn-danger", type: "button", id: "bmc-clear", onclick: () => forget(), text: t("bmc.clear") }) : null));
      form.addEventListener("input", keepDraft);
      form.addEventListener("change", keepDraft);
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const body = { driver: driver.value, user: user.value.trim() };
        if (address.value.trim()) body.address = address.value.trim();
        if (port.value.trim()) body.port = Number(port.value.trim());
        if (password.value) body.password = password.value;
        body.options = driver.value === "redfish" ? { scheme: scheme.value, verify_tls: verify.checked } : {};
        if (driver.value === "redfish" && system.value.trim()) body.options.system = system.value.trim();
        hideError(shown().errorBox);
        try {
          await api("PUT", `${path}/bmc`, body);
          password.value = ""; bmcDraft = null;
          toast(t("bmc.saved", { t: `${idc}/${sn}` }), "ok");
          shown().refresh(true);
        } catch (err) {
          password.value = ""; if (bmcDraft) bmcDraft.values.password = "";
          showErrorIn(shown().errorBox, err);
        }
      });
      return [el("div", { class: "section", text: t("bmc.form") }), form];
    }
    async function forget() {
      const answer = await confirmDialog({ title: t("bmc.clear_title", { t: `${idc}/${sn}` }), warn: t("bmc.clear_warn"),
        withNotes: false, confirmClass: "btn-danger", confirmText: t("bmc.clear") });
      if (!answer) return;
      hideError(shown().errorBox);
      try {
        await api("DELETE", `${path}/bmc`);
        bmcDraft = null;
        toast(t("bmc.cleared", { t: `${idc}/${sn}` }), "ok");
        shown().refresh(true);
      } catch (err) { showErrorIn(shown().errorBox, err); }
    }
    powerView = { seq, errorBox, refresh: (rebuildForm) => { polls = 0; refresh(rebuildForm); } };
    refresh(true);
    return [el("div", { class: "section", text: t("power.section") }),
      el("div", { id: "power-section", "data-idc": idc, "data-sn": sn }, errorBox, status, buttons, formBox)];
  }
  async function openTask(idc, sn, refresh) {
    const seq = ++drawerSeq;
    state.drawer = { kind: "task", idc, sn };
    let data;
    try { data = await api("GET", `/api/v1/tasks/${encodeURIComponent(idc)}/${encodeURIComponent(sn)}`); }
    catch (err) { if (!refresh) showError(err); return; }
    if (seq !== drawerSeq) return;
    const task = data.task;
    const summary = summaryFromFull(task, data.revision);
    const body = openDrawer(`${idc}/${sn}`);
    body.append(
      el("div", { class: "toolbar" }, badge(task.status), progressCell(summary), el("span", { class: "spacer" }), taskButtons(summary),
        el("button", { class: "btn btn-sm", type: "button", onclick: () => openServer(idc, sn), text: t("act.timeline") })),
      el("div", { class: "section", text: t("detail.fields") }),
      kv([[t("col.mac"), task.mac], [t("col.os"), `${task.os_type} ${task.os_version || ""}`], [t("col.image"), task.image],
        [t("form.template"), task.template], [t("col.created_by"), `${task.created_by} · ${fmtTime(task.created_at)}`],
        task.approved_by ? ["approved_by", `${task.approved_by} · ${fmtTime(task.approved_at)}`] : null,
        [t("form.notes"), task.notes], task.reason ? ["reason", task.reason] : null,
        ...installInputs(task.params || {}),
        ["attempt", task.attempt], ["claimed_by", task.claimed_by], ["revision", data.revision],
        [t("col.online"), data.online ? t("servers.online") : t("servers.offline")]]),
      ...scheduleSection(task, data.revision),
      ...powerSection(idc, sn),
      el("div", { class: "section", text: t("detail.history") }),
      el("ol", { class: "timeline" }, (task.history || []).slice().reverse().map((h) =>
        el("li", {}, el("div", { class: "when", text: fmtTime(h.at) }),
          el("div", {}, badge(h.to_status), " ", el("span", { class: "muted", text: `${h.by || ""} ${h.reason ? "— " + h.reason : ""}` }))))),
      el("div", { class: "section", text: t("detail.log") }),
      el("pre", { class: "log mono", id: "task-log", text: (task.logs || []).join("\n") || "—" }));
  }

  // ---- servers -------------------------------------------------------------------------
  let serversBody = null; let serversMore = null; let serverCursor = null;
  const serverFilters = { idc: "", q: "" };
  function renderServersView() {
    const root = clear(document.getElementById("view-servers"));
    const search = el("input", { id: "servers-q", type: "search", placeholder: t("servers.filter.q"), maxlength: "200", value: serverFilters.q });
    const idcSel = el("select", { id: "servers-idc" }, el("option", { value: "", text: `${t("col.idc")}: ${t("common.all")}` }),
      state.idcs.map((i) => el("option", { value: i.name, text: i.name })));
    idcSel.value = serverFilters.idc;
    let timer = null;
    const refilter = () => { serverFilters.q = search.value.trim(); serverFilters.idc = idcSel.value; loadServers(false); };
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refilter, 250); });
    idcSel.addEventListener("change", refilter);
    serversBody = el("tbody", { id: "servers-body" });
    serversMore = el("button", { class: "btn hidden", type: "button", onclick: () => loadServers(true), text: t("common.more") });
    root.append(el("div", { class: "toolbar" }, idcSel, search),
      el("div", { class: "panel" }, el("table", { id: "servers-table" },
        el("thead", {}, el("tr", {}, ["col.idc", "col.sn", "col.vendor", "col.cpu", "col.memory", "col.disks", "col.mac",
          "col.online", "col.task", "col.last_seen", "col.actions"].map((k) => el("th", { text: t(k) })))), serversBody),
      el("div", { class: "toolbar" }, serversMore)));
  }
  function serverRow(s) {
    const key = `${s.idc}/${s.sn}`;
    const mac = s.boot_mac || (s.macs || [])[0] || "";
    return el("tr", { class: "clickable", "data-key": key, "data-sn": s.sn, onclick: () => openServer(s.idc, s.sn) },
      el("td", { text: s.idc }), el("td", { class: "mono sn", text: s.sn }),
      el("td", {}, el("div", { text: s.vendor || "—" }), el("div", { class: "muted", text: s.product || "" })),
      el("td", {}, el("div", { text: s.cpu_model || "—" }), el("div", { class: "muted", text: s.cpu_threads ? `${s.cpu_threads} threads` : "" })),
      el("td", { text: fmtBytes(s.memory_bytes) }), el("td", { text: String(s.disk_count || 0) }),
      el("td", { class: "mono", text: mac }),
      el("td", {}, s.conflict ? el("span", { class: "badge conflict", title: s.conflict, text: t("servers.conflict") })
        : el("span", { class: `badge ${s.online ? "online" : "offline"}`, text: t(s.online ? "servers.online" : "servers.offline") })),
      el("td", {}, s.task_status ? badge(s.task_status) : "—"),
      el("td", { class: "muted", title: fmtTime(s.last_seen), text: fmtAgo(s.last_seen) }),
      el("td", {}, can("operator") && (!s.task_status || !ACTIVE.has(s.task_status)) ? el("button", { class: "btn btn-sm btn-primary", type: "button",
        "data-action": "create-task", onclick: (ev) => { ev.stopPropagation(); createForServer(s); }, text: t("act.create_task") }) : null));
  }
  function createForServer(s) {
    switchView("tasks");
    toggleCreate({ idc: s.idc, sn: s.sn, mac: s.boot_mac || (s.macs || [])[0] || "" });
  }
  async function loadServers(more) {
    if (!serversBody) return;
    const seq = more ? 0 : beginSnapshot("servers");
    try {
      const data = await api("GET", `/api/v1/servers${qs({ idc: serverFilters.idc, q: serverFilters.q, limit: 50, cursor: more ? serverCursor : "" })}`);
      if (!more && !isCurrentSnapshot("servers", seq)) return;
      if (!more) { clear(serversBody); state.servers.clear(); state.serverRows.clear(); }
      for (const s of data.items) {
        const row = serverRow(s); serversBody.append(row);
        state.servers.set(`${s.idc}/${s.sn}`, s); state.serverRows.set(`${s.idc}/${s.sn}`, row);
      }
      if (!more) endSnapshot("servers", data.revision, (msg) => applyServerDelta(msg.t, msg));
      serverCursor = data.next_cursor;
      serversMore.classList.toggle("hidden", !data.next_cursor);
      if (!serversBody.firstChild) serversBody.append(el("tr", {}, el("td", { colspan: "11", class: "empty", text: t("common.none") })));
    } catch (err) {
      if (!more && isCurrentSnapshot("servers", seq)) snapshots.servers.buffer = null;
      if (err.status) showError(err);
    }
  }
  function applyServerDelta(kind, msg) {
    const key = `${msg.idc}/${msg.sn}`;
    const current = state.servers.get(key);
    if (kind === "online") { if (current) { current.online = msg.online; replaceServerRow(current); } return; }
    if (msg.op === "del") { const row = state.serverRows.get(key); if (row) row.remove(); state.servers.delete(key); return; }
    const merged = Object.assign({}, current || {}, msg.server, { task_status: current ? current.task_status : null });
    if (current) replaceServerRow(merged);
    else if (serversBody && state.view === "servers") {
      const row = serverRow(merged); serversBody.prepend(row);
      state.servers.set(key, merged); state.serverRows.set(key, row);
    }
  }
  function replaceServerRow(s) {
    const key = `${s.idc}/${s.sn}`;
    const old = state.serverRows.get(key);
    state.servers.set(key, s);
    if (old) { const row = serverRow(s); old.replaceWith(row); state.serverRows.set(key, row); }
  }
  function invSection(title, value) {
    if (!value || typeof value !== "object") return null;
    return [el("div", { class: "section", text: title }),
      kv(Object.entries(value).filter(([, v]) => typeof v !== "object" || v === null).map(([k, v]) => [k, v === null ? "—" : v]))];
  }
  function invTable(rows, cols) {
    if (!Array.isArray(rows) || !rows.length) return el("p", { class: "muted", text: "—" });
    return el("table", {}, el("thead", {}, el("tr", {}, cols.map((c) => el("th", { text: c })))),
      el("tbody", {}, rows.filter((r) => r && typeof r === "object").map((r) => el("tr", {}, cols.map((c) => {
        let v = r[c];
        if (c === "size_bytes") v = fmtBytes(v);
        if (typeof v === "boolean") v = v ? t("common.yes") : t("common.no");
        return el("td", { class: "mono", text: v === undefined || v === null ? "" : String(v) });
      })))));
  }
  async function clearConflict(idc, sn) {
    const answer = await confirmDialog({ title: t("conflict.title", { t: `${idc}/${sn}` }), warn: t("conflict.warn"),
      withNotes: true, confirmClass: "btn-danger", confirmText: t("act.clear_conflict") });
    if (!answer) return;
    try {
      await api("POST", `/api/v1/servers/${encodeURIComponent(idc)}/${encodeURIComponent(sn)}/clear-conflict`, { notes: answer.notes });
      toast(t("done.clear_conflict", { t: `${idc}/${sn}` }), "ok");
      openServer(idc, sn);
    } catch (err) { showError(err); }
  }
  async function openServer(idc, sn) {
    const seq = ++drawerSeq;
    state.drawer = { kind: "server", idc, sn };
    const path = `/api/v1/servers/${encodeURIComponent(idc)}/${encodeURIComponent(sn)}`;
    const [server, timeline] = await Promise.all([
      api("GET", path).catch(() => null),
      api("GET", `${path}/timeline`).catch(() => null)]);
    if (seq !== drawerSeq) return;
    const body = openDrawer(`${idc}/${sn}`);
    if (server) {
      const s = server.server; const inv = s.inventory || {};
      appendAll(body, 
        el("div", { class: "toolbar" },
          el("span", { class: `badge ${server.online ? "online" : "offline"}`, text: t(server.online ? "servers.online" : "servers.offline") }),
          server.task ? badge(server.task.status) : null, el("span", { class: "spacer" }),
          s.conflict && can("approver") ? el("button", { class: "btn btn-sm btn-danger", type: "button", id: "clear-conflict",
            onclick: () => clearConflict(idc, sn), text: t("act.clear_conflict") }) : null,
          can("operator") && !(server.task && ACTIVE.has(server.task.status)) ? el("button", { class: "btn btn-sm btn-primary", type: "button",
            onclick: () => { document.getElementById("drawer").classList.add("hidden"); createForServer(s); }, text: t("act.create_task") }) : null),
        kv([["SN", s.sn], ["UUID", s.uuid], ["arch", s.arch], ["IP", s.ip], ["MACs", (s.macs || []).join(", ")],
          ["boot MAC", s.boot_mac], [t("servers.conflict"), s.conflict], ["first seen", fmtTime(s.first_seen)], [t("col.last_seen"), fmtTime(s.last_seen)]]),
        powerSection(idc, sn),
        el("div", { class: "section", text: t("detail.inventory") }),
        invSection(t("detail.system"), inv.system), invSection(t("detail.firmware"), inv.firmware),
        invSection("CPU", inv.cpu),
        inv.memory ? [el("div", { class: "section", text: t("col.memory") }), kv([["total", fmtBytes(inv.memory.total_bytes)], ["DIMMs", Array.isArray(inv.memory.dimms) ? inv.memory.dimms.length : "—"]])] : null,
        el("div", { class: "section", text: t("col.disks") }),
        invTable(inv.disks, ["name", "model", "serial", "size_bytes", "rotational", "removable", "by_path"]),
        el("div", { class: "section", text: t("detail.nics") }),
        invTable(inv.nics, ["name", "mac", "driver", "speed_mbps", "link", "booted"]),
        invSection(t("detail.bmc"), inv.bmc), invSection(t("detail.unavailable"), inv.unavailable));
    }
    appendAll(body, el("div", { class: "section", text: t("detail.timeline") }));
    const entries = [];
    if (timeline) {
      for (const e of timeline.entries) entries.push({ at: e.at, stage: e.stage || e.event || e.kind || "event", detail: e });
      for (const h of timeline.transitions) entries.push({ at: h.at, stage: `task → ${h.to}`, detail: { by: h.by, reason: h.reason } });
    }
    entries.sort((a, b) => (a.at || 0) - (b.at || 0));
    if (!entries.length) appendAll(body, el("p", { class: "muted", text: t("detail.no_timeline") }));
    else appendAll(body, el("ol", { class: "timeline", id: "boot-timeline" }, entries.map((e) => {
      const extra = Object.entries(e.detail || {}).filter(([k]) => !["at", "stage"].includes(k))
        .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join("  ");
      return el("li", {}, el("div", { class: "when", text: fmtTime(e.at) }), el("div", { class: "stage", text: String(e.stage) }),
        extra ? el("div", { class: "muted mono", text: extra }) : null);
    })));
  }

  // ---- stats ------------------------------------------------------------------------------
  const STATE_COLORS = { pending: "#e0a800", approved: "#5b8cff", booting: "#38a3f5", installing: "#1f5eff",
    succeeded: "#1a9a5a", failed: "#d03a3a", rejected: "#9aa5b6", cancelled: "#c3cad5",
    releasing: "#e08a00", released: "#7d8799" };
  async function loadStats() {
    const root = clear(document.getElementById("view-stats"));
    let s;
    try { s = await api("GET", "/api/v1/stats"); } catch (err) { showError(err); return; }
    const card = (label, value, id) => el("div", { class: "card", id }, el("div", { class: "label", text: label }), el("div", { class: "big", text: String(value) }));
    root.append(el("div", { class: "cards" },
      card(t("stats.total"), s.total, "stat-total"),
      ["pending", "installing", "succeeded", "failed"].map((k) => card(t(`status.${k}`), (s.per_state || {})[k] || 0, `stat-${k}`)),
      card(t("stats.median"), fmtDuration(s.median_install_seconds), "stat-median"),
      card(t("stats.servers"), `${s.servers} (${s.servers_online})`, "stat-servers")));
    root.append(el("div", { class: "charts" },
      el("div", { class: "panel" }, el("h3", { text: t("stats.per_hour") }), hourChart(s.installs_per_hour || []),
        el("div", { class: "legend" }, el("span", {}, el("span", { class: "sw sw-ok" }), t("stats.succeeded")), el("span", {}, el("span", { class: "sw sw-bad" }), t("stats.failed")))),
      el("div", { class: "panel" }, el("h3", { text: t("stats.per_state") }), stateBars(s.per_state || {})),
      el("div", { class: "panel" }, el("h3", { text: t("stats.per_idc") }), idcBars(s.per_idc || {}))));
    for (const sw of root.querySelectorAll(".sw-ok")) sw.style.background = STATE_COLORS.succeeded;
    for (const sw of root.querySelectorAll(".sw-bad")) sw.style.background = STATE_COLORS.failed;
  }
  function hourChart(hours) {
    const W = 720; const H = 220; const pad = 30;
    const max = Math.max(4, Math.ceil(Math.max(0, ...hours.map((h) => h.succeeded + h.failed)) / 4) * 4);
    const bw = (W - pad * 2) / Math.max(1, hours.length);
    const chart = svg("svg", { class: "chart", id: "chart-hours", viewBox: `0 0 ${W} ${H}`, role: "img" });
    for (let i = 0; i <= 4; i++) {
      const y = H - pad - (H - pad * 2) * i / 4;
      chart.append(svg("line", { x1: pad, x2: W - pad, y1: y, y2: y, stroke: "#eef1f5" }),
        svg("text", { x: 4, y: y + 4, text: String(Math.round(max * i / 4)) }));
    }
    hours.forEach((h, i) => {
      const x = pad + i * bw + 2;
      const hs = (H - pad * 2) * h.succeeded / max; const hf = (H - pad * 2) * h.failed / max;
      chart.append(svg("rect", { x, y: H - pad - hs, width: bw - 4, height: hs, fill: STATE_COLORS.succeeded, rx: 2 },
        svg("title", { text: `${fmtTime(h.hour_start)}: ${h.succeeded}` })));
      if (hf) chart.append(svg("rect", { x, y: H - pad - hs - hf, width: bw - 4, height: hf, fill: STATE_COLORS.failed, rx: 2 }));
      if (i % 3 === 0) chart.append(svg("text", { x, y: H - 10, text: new Date(h.hour_start * 1000).getHours() + ":00" }));
    });
    return chart;
  }
  function stateBars(perState) {
    const entries = STATES.map((s) => [s, perState[s] || 0]);
    const max = Math.max(1, ...entries.map(([, n]) => n));
    const W = 360; const row = 26;
    const chart = svg("svg", { class: "chart", id: "chart-states", viewBox: `0 0 ${W} ${entries.length * row + 6}`, role: "img" });
    entries.forEach(([s, n], i) => {
      const y = i * row + 4; const w = (W - 140) * n / max;
      chart.append(svg("text", { x: 0, y: y + 15, text: t(`status.${s}`) }),
        svg("rect", { x: 90, y, width: Math.max(1, w), height: 18, fill: STATE_COLORS[s], rx: 3 }),
        svg("text", { x: 96 + w, y: y + 14, text: String(n) }));
    });
    return chart;
  }
  function idcBars(perIdc) {
    const names = Object.keys(perIdc);
    if (!names.length) return el("p", { class: "muted", text: t("common.none") });
    const totals = names.map((n) => Object.values(perIdc[n]).reduce((a, b) => a + b, 0));
    const max = Math.max(1, ...totals);
    const W = 720; const row = 28;
    const chart = svg("svg", { class: "chart", id: "chart-idcs", viewBox: `0 0 ${W} ${names.length * row + 6}`, role: "img" });
    names.forEach((name, i) => {
      let x = 90; const y = i * row + 4;
      chart.append(svg("text", { x: 0, y: y + 15, text: name }));
      for (const s of STATES) {
        const n = perIdc[name][s] || 0; if (!n) continue;
        const w = (W - 160) * n / max;
        chart.append(svg("rect", { x, y, width: w, height: 18, fill: STATE_COLORS[s] }, svg("title", { text: `${t(`status.${s}`)}: ${n}` })));
        x += w;
      }
      chart.append(svg("text", { x: x + 6, y: y + 14, text: String(totals[i]) }));
    });
    return chart;
  }

  // ---- batch import ---------------------------------------------------------------------------
  function renderBatchView() {
    const root = clear(document.getElementById("view-batch"));
    const text = el("textarea", { id: "batch-text", rows: "10", class: "mono",
      placeholder: 'idc,sn,mac,os_type,os_version\ndc1,SN-0001,00:1a:2b:3c:4d:5e,Ubuntu 22.04,22.04' });
    const file = el("input", { type: "file", id: "batch-file", accept: ".json,.csv,text/csv,application/json" });
    const result = el("div", { id: "batch-result" });
    file.addEventListener("change", async () => { if (file.files[0]) text.value = await file.files[0].text(); });
    const submit = el("button", { class: "btn btn-primary", id: "batch-submit", type: "button", text: t("batch.submit"), disabled: !can("operator") });
    submit.addEventListener("click", async () => {
      clear(result);
      const raw = text.value.trim(); if (!raw) return;
      const isJson = raw.startsWith("[") || raw.startsWith("{");
      try {
        const res = await api("POST", "/api/v1/tasks/batch", raw, { "Content-Type": isJson ? "application/json" : "text/csv" });
        result.append(el("p", { class: "toast ok", text: t("batch.created", { n: res.created }) }));
      } catch (err) {
        result.append(el("p", { class: "alert", text: `${t("batch.refused")} ${err.message}` }));
        if (err.body && Array.isArray(err.body.errors)) {
          result.append(el("table", { class: "errors" }, el("thead", {}, el("tr", {}, ["col.row", "col.field", "col.error"].map((k) => el("th", { text: t(k) })))),
            el("tbody", {}, err.body.errors.map((e) => el("tr", {}, el("td", { text: String(e.row + 1) }), el("td", { text: e.field || "" }), el("td", { text: e.error }))))));
        }
      }
    });
    root.append(el("div", { class: "panel" }, el("h2", { text: t("batch.title") }), el("p", { class: "muted", text: t("batch.help") }),
      el("div", { class: "form-grid" }, el("label", { class: "wide" }, t("batch.file"), file), el("div", { class: "wide" }, text)),
      el("div", { class: "toolbar" }, submit), result));
  }

  // ---- templates -------------------------------------------------------------------------
  async function loadTemplates() {
    try { state.templates = (await api("GET", "/api/v1/templates")).items; } catch (err) { state.templates = []; }
  }
  async function renderTemplatesView() {
    const root = clear(document.getElementById("view-templates"));
    await loadTemplates();
    const tbody = el("tbody", {}, state.templates.length ? state.templates.map((tp) => el("tr", {},
      el("td", { class: "mono", text: tp.name }), el("td", { text: tp.os_type }), el("td", { text: tp.os_version || "" }),
      el("td", { text: tp.image || "" }), el("td", { text: tp.description || "" }), el("td", { class: "mono", text: JSON.stringify(tp.params || {}) }),
      el("td", {}, can("operator") ? el("button", { class: "btn btn-sm btn-danger", type: "button", text: t("common.delete"), onclick: async () => {
        try { await api("DELETE", `/api/v1/templates/${encodeURIComponent(tp.name)}`); renderTemplatesView(); } catch (err) { showError(err); }
      } }) : null))) : el("tr", {}, el("td", { colspan: "7", class: "empty", text: t("common.none") })));
    root.append(el("div", { class: "panel" }, el("h2", { text: t("templates.title") }),
      el("table", {}, el("thead", {}, el("tr", {}, ["col.name", "col.os", "col.version", "col.image", "col.description", "form.params", "col.actions"].map((k) => el("th", { text: t(k) })))), tbody)));
    if (can("operator")) {
      const name = el("input", { id: "tpl-name", maxlength: "64", placeholder: "ubuntu-web" });
      const os = el("input", { id: "tpl-os", maxlength: "64", placeholder: "Ubuntu 22.04" });
      const ver = el("input", { id: "tpl-version", maxlength: "32" });
      const image = el("input", { id: "tpl-image", maxlength: "64" });
      const desc = el("input", { id: "tpl-desc", maxlength: "500" });
      const params = el("textarea", { id: "tpl-params", class: "mono", rows: "3", placeholder: '{"root_device_hints": {"size_min_gb": 100}}' });
      const form = el("form", { class: "form-grid" }, el("label", {}, t("form.name"), name), el("label", {}, t("form.os"), os),
        el("label", {}, t("form.os_version"), ver), el("label", {}, t("form.image"), image),
        el("label", { class: "wide" }, t("form.description"), desc), el("label", { class: "wide" }, t("form.params"), params),
        el("div", {}, el("button", { class: "btn btn-primary", type: "submit", text: t("common.save") })));
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        let p = {};
        try { p = params.value.trim() ? JSON.parse(params.value) : {}; } catch (e) { toast(`params: ${e.message}`, "error"); return; }
        try {
          await api("PUT", `/api/v1/templates/${encodeURIComponent(name.value.trim())}`, { os_type: os.value, os_version: ver.value, image: image.value, description: desc.value, params: p });
          toast(t("templates.saved", { t: name.value.trim() }), "ok"); renderTemplatesView();
        } catch (err) { showError(err); }
      });
      root.append(el("div", { class: "panel" }, el("h3", { text: t("templates.new") }), form));
    }
  }

  // ---- audit -------------------------------------------------------------------------------
  let auditCursor = null;
  function renderAuditView() {
    const root = clear(document.getElementById("view-audit"));
    const actor = el("input", { id: "audit-actor", placeholder: t("audit.filter.actor"), maxlength: "32" });
    const action = el("input", { id: "audit-action", placeholder: t("audit.filter.action"), maxlength: "64" });
    const target = el("input", { id: "audit-target", placeholder: t("audit.filter.target"), maxlength: "128" });
    const tbody = el("tbody", { id: "audit-body" });
    const more = el("button", { class: "btn hidden", type: "button", text: t("common.more") });
    const load = async (append) => {
      try {
        const data = await api("GET", `/api/v1/audit${qs({ actor: actor.value.trim(), action: action.value.trim(), target: target.value.trim(), limit: 100, cursor: append ? auditCursor : "" })}`);
        if (!append) clear(tbody);
        for (const r of data.items) {
          const status = (o) => (o && typeof o === "object" && o.status) ? o.status : (o === null || o === undefined ? "—" : "");
          tbody.append(el("tr", {}, el("td", { class: "muted", text: fmtTime(r.at) }), el("td", { text: r.actor }),
            el("td", { class: "mono", text: r.action }), el("td", { class: "mono", text: r.target }),
            el("td", { text: `${status(r.before)} → ${status(r.after)}` }), el("td", { text: r.detail || "" }),
            el("td", { class: "muted", text: r.source || "" })));
        }
        if (!tbody.firstChild) tbody.append(el("tr", {}, el("td", { colspan: "7", class: "empty", text: t("common.none") })));
        auditCursor = data.next_cursor; more.classList.toggle("hidden", !data.next_cursor);
      } catch (err) { showError(err); }
    };
    more.addEventListener("click", () => load(true));
    const go = el("button", { class: "btn", type: "button", text: t("common.search"), onclick: () => load(false) });
    root.append(el("div", { class: "toolbar" }, actor, action, target, go),
      el("div", { class: "panel" }, el("table", { id: "audit-table" }, el("thead", {}, el("tr", {},
        ["col.time", "col.actor", "col.action", "col.target", "col.status", "col.detail", "source"].map((k) => el("th", { text: t(k) })))), tbody),
      el("div", { class: "toolbar" }, more)));
    load(false);
  }

  // ---- webhooks (admins) ------------------------------------------------------------------
  const WEBHOOK_EVENTS = ["task.state", "node.liveness"];
  async function renderWebhooksView() {
    const root = clear(document.getElementById("view-webhooks"));
    if (!can("admin")) { root.append(el("p", { class: "alert", text: t("err.forbidden") })); return; }
    let hooks = [];
    try { hooks = (await api("GET", "/api/v1/webhooks")).items; } catch (err) { showError(err); }
    const log = el("div", { id: "webhook-log" });
    const showLog = async (hook) => {
      clear(log);
      let items = [];
      try { items = (await api("GET", `/api/v1/webhooks/${encodeURIComponent(hook.id)}/deliveries`)).items; } catch (err) { showError(err); return; }
      const rows = items.length ? items.map((d) => el("tr", { "data-outcome": d.outcome },
        el("td", { class: "muted", text: fmtTime(d.at) }), el("td", { class: "mono", text: d.event }),
        el("td", { class: "mono", text: d.delivery }), el("td", { text: String(d.attempt) }),
        el("td", { text: d.status === null || d.status === undefined ? "—" : String(d.status) }),
        el("td", { text: `${Math.round((d.duration || 0) * 1000)} ms` }),
        el("td", { class: `outcome o-${d.outcome}`, text: t(`webhooks.outcome.${d.outcome}`) }),
        el("td", { text: d.error || "" })))
        : [el("tr", {}, el("td", { colspan: "8", class: "empty", text: t("webhooks.no_deliveries") }))];
      log.append(el("div", { class: "panel" },
        el("div", { class: "toolbar" }, el("h3", { text: t("webhooks.deliveries", { url: hook.url }) }),
          el("button", { class: "btn btn-sm", type: "button", id: "webhook-log-refresh", text: t("common.refresh"), onclick: () => showLog(hook) })),
        el("table", { id: "webhook-deliveries" }, el("thead", {}, el("tr", {},
          ["col.time", "webhooks.event", "webhooks.delivery", "webhooks.attempt", "col.status", "webhooks.duration", "webhooks.outcome", "col.error"].map((k) => el("th", { text: t(k) })))),
        el("tbody", {}, rows))));
    };
    const tbody = el("tbody", {}, hooks.length ? hooks.map((h) => el("tr", { "data-webhook": h.id },
      el("td", { class: "mono", text: h.url }), el("td", { class: "mono", text: (h.events || []).join(", ") }),
      el("td", { text: h.enabled ? t("common.yes") : t("common.no") }), el("td", { text: h.description || "" }),
      el("td", { class: "muted", text: h.updated_by || h.created_by || "" }),
      el("td", {},
        el("button", { class: "btn btn-sm", type: "button", text: t("webhooks.log"), onclick: () => showLog(h) }), " ",
        el("button", { class: "btn btn-sm", type: "button", text: h.enabled ? t("webhooks.disable") : t("webhooks.enable"), onclick: async () => {
          try { await api("PUT", `/api/v1/webhooks/${encodeURIComponent(h.id)}`, { enabled: !h.enabled, revision: h.revision }); renderWebhooksView(); } catch (err) { showError(err); }
        } }), " ",
        el("button", { class: "btn btn-sm btn-danger", type: "button", text: t("common.delete"), onclick: async () => {
          try { await api("DELETE", `/api/v1/webhooks/${encodeURIComponent(h.id)}`); renderWebhooksView(); } catch (err) { showError(err); }
        } }))))
      : el("tr", {}, el("td", { colspan: "6", class: "empty", text: t("common.none") })));
    root.append(el("div", { class: "panel" }, el("h2", { text: t("webhooks.title") }), el("p", { class: "muted", text: t("webhooks.help") }),
      el("table", { id: "webhooks-table" }, el("thead", {}, el("tr", {},
        ["webhooks.url", "webhooks.events", "webhooks.enabled", "col.description", "col.actor", "col.actions"].map((k) => el("th", { text: t(k) })))), tbody)));
    const url = el("input", { id: "webhook-url", maxlength: "2048", placeholder: "https://hooks.example.net/lpmos" });
    const desc = el("input", { id: "webhook-desc", maxlength: "200" });
    const boxes = WEBHOOK_EVENTS.map((ev) => el("input", { type: "checkbox", value: ev, checked: true, id: `webhook-ev-${ev.replace(".", "-")}` }));
    const secretOut = el("div", { id: "webhook-secret" });
    const form = el("form", { class: "form-grid", id: "webhook-form" },
      el("label", { class: "wide" }, t("webhooks.url"), url), el("label", { class: "wide" }, t("col.description"), desc),
      el("fieldset", { class: "wide" }, el("legend", { text: t("webhooks.events") }),
        boxes.map((b) => el("label", { class: "inline" }, b, ` ${b.value}`))),
      el("div", {}, el("button", { class: "btn btn-primary", type: "submit", id: "webhook-create", text: t("webhooks.create") })));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clear(secretOut);
      const events = boxes.filter((b) => b.checked).map((b) => b.value);
      try {
        const res = await api("POST", "/api/v1/webhooks", { url: url.value.trim(), events, description: desc.value.trim() });
        await renderWebhooksView();
        const out = document.getElementById("webhook-secret");
        out.append(el("p", { class: "toast ok", text: t("webhooks.secret_once") }), el("code", { class: "mono", id: "webhook-secret-value", text: res.secret }));
      } catch (err) { showError(err); }
    });
    root.append(el("div", { class: "panel" }, el("h3", { text: t("webhooks.new") }), form, secretOut), log);
  }

  // ---- managed images --------------------------------------------------------------------
  function readiness(img) {
    return (img.copies || []).map((c) => `${c.idc} ${c.ready}/${c.nodes.filter((n) => n.alive).length}`).join(", ") || "-";
  }
  let imagesTimer = null;
  function renderImagesView() {
    // the list refreshes on live changes; the form is built once, so typing is never wiped
    const view = clear(document.getElementById("view-images"));
    view.append(el("div", { id: "images-list" }));
    if (can("admin")) view.append(imageForm());
    refreshImages();
  }
  async function refreshImages() {
    let items = [];
    try { items = (await api("GET", "/api/v1/images")).items; } catch (err) { showError(err); }
    const root = document.getElementById("images-list");
    if (!root) return;
    clear(root);
    const tbody = el("tbody", {}, items.length ? items.map((img) => el("tr", { "data-image": img.name },
      el("td", { class: "mono", text: img.name }), el("td", { text: img.os_type }), el("td", { text: img.format }),
      el("td", { text: img.source }), el("td", { text: img.state }), el("td", { text: fmtBytes(img.size) }),
      el("td", { class: "ready", text: readiness(img) }), el("td", { text: String(img.in_use_by) }),
      el("td", {}, can("admin") ? el("button", { class: "btn btn-sm btn-danger", type: "button", text: t("images.remove"), onclick: async () => {
        try { await api("DELETE", `/api/v1/images/${encodeURIComponent(img.name)}`); toast(t("images.removed", { name: img.name }), "ok"); refreshImages(); } catch (err) { showError(err); }
      } }) : ""))) : [el("tr", {}, el("td", { colspan: "9", class: "empty", text: t("images.none") }))]);
    root.append(el("div", { class: "panel" }, el("h2", { text: t("images.title") }), el("p", { class: "muted", text: t("images.help") }),
      el("table", { id: "images-table" }, el("thead", {}, el("tr", {},
        ["images.name", "col.os", "images.format", "images.source", "images.state", "images.size", "images.ready", "images.in_use", "col.actions"].map((k) => el("th", { text: t(k) })))), tbody)));
    for (const img of items) {
      const rows = (img.copies || []).flatMap((c) => c.nodes.map((n) => el("tr", { "data-copy": `${c.idc}/${n.node}`, "data-state": n.state },
        el("td", { text: c.idc }), el("td", { text: n.node }), el("td", { text: n.state }),
        el("td", {}, el("progress", { max: "100", value: String(Math.round((n.progress || 0) * 100)) }), ` ${Math.round((n.progress || 0) * 100)} %`),
        el("td", { text: n.reason || "" }))));
      root.append(el("div", { class: "panel" }, el("h3", { text: t("images.copies", { name: img.name }) }),
        rows.length ? el("table", { class: "copies", "data-copies": img.name }, el("thead", {}, el("tr", {},
          ["col.idc", "images.node", "images.state", "images.progress", "images.reason"].map((k) => el("th", { text: t(k) })))), el("tbody", {}, rows))
          : el("p", { class: "muted", text: t("images.no_nodes") })));
    }
  }
  function imageForm() {
    const f = (id, attrs) => el("input", Object.assign({ id }, attrs || {}));
    const name = f("image-name", { maxlength: "64", placeholder: "golden-debian-12" });
    const osType = f("image-os-type", { maxlength: "200", placeholder: "Debian 12" });
    const family = el("select", { id: "image-os-family" }, ["debian", "ubuntu", "rhel", "lab"].map((v) => el("option", { value: v, text: v })));
    const version = f("image-version", { maxlength: "32" });
    const format = el("select", { id: "image-format" }, ["raw", "qcow2", "raw.zst", "raw.xz", "raw.gz"].map((v) => el("option", { value: v, text: v })));
    const arch = el("select", { id: "image-arch" }, ["x86_64", "arm64"].map((v) => el("option", { value: v, text: v })));
    const idcs = f("image-idcs", { maxlength: "500", placeholder: "dc1, dc2" });
    const file = f("image-file", { type: "file" });
    const url = f("image-url", { maxlength: "2048", placeholder: "https://images.example.net/golden.raw.zst" });
    const sha = f("image-sha256", { maxlength: "64", class: "mono" });
    const bar = el("progress", { id: "image-upload-progress", max: "100", value: "0", class: "hidden" });
    const status = el("span", { id: "image-upload-status", class: "muted" });
    const form = el("form", { class: "form-grid", id: "image-form" },
      el("label", {}, t("images.name"), name), el("label", {}, t("images.os_type"), osType),
      el("label", {}, t("images.os_family"), family), el("label", {}, t("images.version"), version),
      el("label", {}, t("images.format"), format), el("label", {}, t("images.arch"), arch),
      el("label", { class: "wide" }, t("images.idcs"), idcs),
      el("label", { class: "wide" }, t("images.file"), file),
      el("label", { class: "wide" }, t("images.url"), url), el("label", { class: "wide" }, t("images.sha256"), sha),
      el("div", { class: "wide" }, el("button", { class: "btn btn-primary", type: "submit", id: "image-add", text: t("images.add") }), " ", bar, " ", status));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const chosen = file.files && file.files[0];
      if (!chosen && !(url.value.trim() && sha.value.trim())) { toast(t("images.need_source"), "error"); return; }
      const body = { name: name.value.trim(), os_type: osType.value.trim(), os_family: family.value, version: version.value.trim(),
        format: format.value, architectures: [arch.value], source: chosen ? "upload" : "url",
        idcs: idcs.value.split(",").map((s) => s.trim()).filter(Boolean) };
      body.files = { disk_image: chosen ? { size: chosen.size } : { url: url.value.trim(), sha256: sha.value.trim().toLowerCase() } };
      try {
        await api("POST", "/api/v1/images", body);
        if (chosen) await uploadFile(`/api/v1/images/${encodeURIComponent(body.name)}/files/disk_image`, chosen, (pct) => {
          bar.classList.remove("hidden"); bar.value = pct; status.textContent = t("images.uploading", { name: body.name, pct });
        });
        toast(t("images.added", { name: body.name }), "ok");
        form.reset(); bar.classList.add("hidden"); status.textContent = "";
        refreshImages();
      } catch (err) { showError(err); }
    });
    return el("div", { class: "panel" }, el("h3", { text: t("images.new") }), form);
  }
  function uploadFile(path, file, onProgress) {
    // XMLHttpRequest, not fetch: it reports upload progress; the body is the File, streamed by the browser
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", path);
      xhr.setRequestHeader("X-CSRF-Token", CSRF);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(Math.floor((e.loaded * 100) / e.total)); });
      xhr.addEventListener("load", () => {
        let data = null; try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
        if (xhr.status >= 200 && xhr.status < 300) { onProgress(100); resolve(data); } else reject(new ApiFailure(xhr.status, data));
      });
      xhr.addEventListener("error", () => reject(new ApiFailure(0, { detail: t("err.network") })));
      xhr.send(file);
    });
  }

  // ---- IDC strip -------------------------------------------------------------------------------
  async function loadIdcs() {
    try { state.idcs = (await api("GET", "/api/v1/idcs")).items; } catch (err) { state.idcs = []; }
    const strip = clear(document.getElementById("idc-strip"));
    if (!state.idcs.length) strip.append(el("span", { class: "muted", text: t("idc.none") }));
    for (const idc of state.idcs) {
      strip.append(el("span", { class: `idc-chip ${idc.nodes_alive ? "alive" : ""}`, title: idc.nodes.map((n) => n.name).join(", ") },
        el("span", { class: "dot" }), el("strong", { text: idc.name }),
        el("span", { class: "muted", text: `${idc.nodes_alive} ${t("idc.nodes")} · ${idc.tasks} ${t("nav.tasks").toLowerCase()}` })));
    }
  }
  async function loadCatalog() {
    try { state.catalog = (await api("GET", "/api/v1/catalog")).items; } catch (err) { state.catalog = []; }
  }

  // ---- views ---------------------------------------------------------------------------------------
  function switchView(view) {
    state.view = view;
    for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
    for (const sec of document.querySelectorAll(".view")) sec.classList.toggle("hidden", sec.id !== `view-${view}`);
    if (view === "tasks") { renderTasksView(); loadTasks(false); }
    if (view === "servers") { renderServersView(); loadServers(false); }
    if (view === "stats") loadStats();
    if (view === "batch") renderBatchView();
    if (view === "templates") renderTemplatesView();
    if (view === "audit") renderAuditView();
    if (view === "webhooks") renderWebhooksView();
    if (view === "images") renderImagesView();
    history.replaceState(null, "", `#${view}`);
  }
  function reloadView() {
    loadIdcs();
    if (state.view === "tasks") loadTasks(false);
    if (state.view === "servers") loadServers(false);
    if (state.view === "stats") loadStats();
  }

  // ---- live updates ----------------------------------------------------------------------------------
  let socket = null; let backoff = 1000; let statsTimer = null; let idcTimer = null;
  function setLive(mode) {
    const box = document.getElementById("live-status");
    box.classList.toggle("on", mode === "live"); box.classList.toggle("off", mode === "offline");
    document.getElementById("live-text").textContent = t(`live.${mode}`);
  }
  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${proto}//${location.host}/ws${state.rev ? `?since=${state.rev}` : ""}`;
    socket = new WebSocket(url);
    socket.addEventListener("open", () => { backoff = 1000; setLive("live"); });
    socket.addEventListener("message", (ev) => {
      let msg; try { msg = JSON.parse(ev.data); } catch (e) { return; }
      onMessage(msg);
    });
    socket.addEventListener("close", () => {
      setLive("offline");
      const wait = backoff * (0.5 + Math.random());
      backoff = Math.min(15000, backoff * 2);
      setTimeout(connect, wait);
    });
  }
  function onMessage(msg) {
    if (typeof msg.rev === "number" && msg.rev > state.rev) state.rev = msg.rev;
    switch (msg.t) {
      case "hello": if (msg.resync) reloadView(); break;
      case "resync": reloadView(); break;
      case "task":
        keepDelta("tasks", msg); applyTaskDelta(msg); scheduleStats();
        if (msg.op === "del" || (msg.task && msg.task.status)) { clearTimeout(idcTimer); idcTimer = setTimeout(loadIdcs, 1500); }
        break;
      case "server": case "online": keepDelta("servers", msg); applyServerDelta(msg.t, msg); break;
      case "node": clearTimeout(idcTimer); idcTimer = setTimeout(loadIdcs, 500); break;
      case "template": loadTemplates(); break;
      case "image":
        loadCatalog();
        if (state.view === "images") { clearTimeout(imagesTimer); imagesTimer = setTimeout(refreshImages, 500); }
        break;
      case "timeline":
        if (state.drawer && state.drawer.kind === "server" && state.drawer.idc === msg.idc && state.drawer.sn === msg.sn) openServer(msg.idc, msg.sn);
        break;
      default: break;
    }
  }
  function scheduleStats() {
    if (state.view !== "stats") return;
    clearTimeout(statsTimer); statsTimer = setTimeout(loadStats, 1500);
  }

  // ---- start ---------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", async () => {
    I.apply(document);
    document.getElementById("who-user").textContent = ME.user;
    document.getElementById("who-role").textContent = ME.role;
    document.getElementById("drawer-close").addEventListener("click", () => {
      document.getElementById("drawer").classList.add("hidden"); state.drawer = null; drawerSeq++; bmcDraft = null;
    });
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") document.getElementById("drawer-close").click(); });
    for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchView(tab.dataset.view));
    await Promise.all([loadIdcs(), loadCatalog(), loadTemplates()]);
    const initial = (location.hash || "#tasks").slice(1);
    const views = ["tasks", "servers", "stats", "batch", "templates", "audit", "images"].concat(can("admin") ? ["webhooks"] : []);
    switchView(views.includes(initial) ? initial : "tasks");
    setLive("connecting");
    connect();
  });
})();
