/* LPMOS console: a task's full install log, on demand.
 *
 * The task drawer shows the newest lines the task document keeps; the
 * whole log of the attempt stays with the regional node that served it and
 * comes from GET /api/v1/tasks/{idc}/{sn}/log.  This adds a "Full log"
 * button under the drawer's log (the drawer is rebuilt on every live
 * update, so the button and an open panel are put back each time from what
 * was fetched, without fetching again).  Text only: textContent, never HTML. */
"use strict";
(function () {
  const t = window.LPMOS_I18N.t;
  const body = document.getElementById("drawer-body");
  const title = document.getElementById("drawer-title");
  if (!body || !title) return;
  const shown = new Map();        // "idc/sn" → the answer, or null while it loads

  function drawerTask() {
    const parts = (title.textContent || "").split("/");
    return parts.length === 2 && parts[0] && parts[1] ? { idc: parts[0], sn: parts[1], key: parts.join("/") } : null;
  }

  function render(panel, data) {
    panel.replaceChildren();
    const note = (text, cls) => { const p = document.createElement("p"); p.className = cls; p.textContent = text; panel.append(p); };
    if (data === null) { note(t("common.loading"), "muted"); return; }
    if (data.error) { note(data.error, "error"); return; }
    note(t("log.full.meta", { attempt: data.attempt, attempts: data.attempts, node: data.node, n: data.lines.length }), "muted");
    if (data.first_line > 0) note(t("log.full.dropped", { n: data.first_line }), "muted");
    const pre = document.createElement("pre");
    pre.className = "log mono";
    pre.id = "full-log-text";
    pre.textContent = data.lines.join("\n") || "—";
    panel.append(pre);
  }

  async function load(task) {
    shown.set(task.key, null);
    decorate(true);
    let data;
    try {
      const resp = await fetch(`/api/v1/tasks/${encodeURIComponent(task.idc)}/${encodeURIComponent(task.sn)}/log`,
        { credentials: "same-origin", headers: { Accept: "application/json" } });
      const json = await resp.json().catch(() => null);
      data = resp.ok && json && Array.isArray(json.lines) ? json
        : { error: `${resp.status}: ${(json && json.detail) || resp.statusText}` };
    } catch (e) { data = { error: t("err.network") }; }
    if (shown.has(task.key)) { shown.set(task.key, data); decorate(true); }
  }

  function decorate(again) {
    const log = document.getElementById("task-log");
    const task = drawerTask();
    if (!log || !task) return;
    let button = document.getElementById("full-log-toggle");
    let panel = document.getElementById("full-log");
    if (!button || !panel) {
      button = document.createElement("button");
      button.type = "button"; button.className = "btn btn-sm"; button.id = "full-log-toggle";
      button.addEventListener("click", () => {
        if (shown.has(task.key)) { shown.delete(task.key); decorate(true); } else load(task);
      });
      panel = document.createElement("div");
      panel.id = "full-log";
      log.after(button, panel);
    } else if (!again) return;
    const open = shown.has(task.key);
    button.textContent = t(open ? "log.full.hide" : "log.full.show");
    if (open) render(panel, shown.get(task.key)); else panel.replaceChildren();
  }

  new MutationObserver(() => decorate(false)).observe(body, { childList: true });
  decorate(false);
})();
