// tokenbroker status page: follows /v1/events and updates the rows in place.
// No framework, no build step; text goes in through textContent only (never innerHTML).
"use strict";

(function () {
  const page = document.getElementById("page");
  if (!page) return;
  const csrf = page.dataset.csrf;

  function ago(seconds) {
    if (seconds === null || isNaN(seconds)) return "-";
    seconds = Math.max(0, seconds);
    const units = [[86400, "d"], [3600, "h"], [60, "min"]];
    for (const [size, unit] of units) {
      if (seconds >= size) return Math.floor(seconds / size) + " " + unit;
    }
    return Math.floor(seconds) + " s";
  }

  function num(text) {
    return text === undefined || text === "" || text === "None" || text === "null" ? null : Number(text);
  }

  function now() {
    return Date.now() / 1000;
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function form(action, label, fields, css) {
    const f = el("form", { method: "post", action: action, class: "inline" });
    f.appendChild(el("input", { type: "hidden", name: "csrf", value: csrf }));
    for (const [key, value] of Object.entries(fields)) {
      f.appendChild(el("input", { type: "hidden", name: key, value: value }));
    }
    f.appendChild(el("button", { type: "submit", class: css }, label));
    return f;
  }

  function cell(row, css) {
    return row.querySelector("td." + css);
  }

  function findRow(item) {
    for (const row of document.querySelectorAll("[data-item]")) {
      if (row.dataset.item === item) return row;
    }
    return null;
  }

  function clearEmpty(tbody) {
    const empty = tbody.closest("section").querySelector("p.empty");
    if (empty) empty.textContent = "";
  }

  // -- providers ---------------------------------------------------------------------

  function providerRow(d) {
    const row = el("tr", { "data-item": d.item });
    row.appendChild(el("td", { class: "name" }, d.name));
    row.appendChild(el("td", {}, d.grant));
    const state = el("td", { class: "state" });
    state.appendChild(el("span", { class: "state" }));
    row.appendChild(state);
    for (const css of ["expires", "refreshed", "error"]) row.appendChild(el("td", { class: css }));
    const actions = el("td", { class: "actions" });
    actions.appendChild(form("/ui/jobs", "Refresh", { kind: "refresh", provider: d.name }, "refresh"));
    if (d.reauthorizable) {
      actions.appendChild(
        form("/ui/jobs", "Re-authorise", { kind: "authorize", provider: d.name }, "authorize"));
    }
    actions.appendChild(el("span", { class: "note" }));
    row.appendChild(actions);
    return row;
  }

  function onProvider(d) {
    const tbody = document.querySelector('tbody[data-kind="provider"]');
    let row = findRow(d.item);
    if (!row) {
      row = providerRow(d);
      tbody.appendChild(row);
      clearEmpty(tbody);
    }
    row.dataset.expiresAt = d.expires_at === null ? "" : d.expires_at;
    row.dataset.lastRefresh = d.last_refresh === null ? "" : d.last_refresh;
    row.dataset.severity = d.severity;
    row.dataset.state = d.state;
    const span = cell(row, "state").querySelector("span");
    span.textContent = d.state;
    span.className = "state " + d.state;
    let error = d.last_error || "-";
    if (d.last_code) error += " (" + d.last_code + ")";
    cell(row, "error").textContent = error;
    const rows = Array.from(tbody.rows);
    rows.sort((a, b) => (num(b.dataset.severity) || 0) - (num(a.dataset.severity) || 0)
      || a.dataset.item.localeCompare(b.dataset.item));
    for (const r of rows) tbody.appendChild(r);
    tick();
  }

  // -- pools -------------------------------------------------------------------------

  function onPool(d) {
    const tbody = document.querySelector('tbody[data-kind="pool"]');
    let row = findRow(d.item);
    if (!row) {
      row = el("tr", { "data-item": d.item });
      row.appendChild(el("td", { class: "name" }, d.prefix));
      row.appendChild(el("td", {}, d.provider));
      for (const css of ["leased", "idle", "refreshing", "failed", "waiting", "oldest_wait"]) {
        row.appendChild(el("td", { class: css }));
      }
      tbody.appendChild(row);
      clearEmpty(tbody);
    }
    for (const css of ["leased", "idle", "refreshing", "failed", "waiting"]) {
      cell(row, css).textContent = String(d[css]);
    }
    cell(row, "oldest_wait").textContent = d.oldest_wait === null ? "-" : ago(d.oldest_wait);
  }

  // -- jobs --------------------------------------------------------------------------

  function jobRow(d) {
    const row = el("tr", { "data-item": d.item });
    const name = el("td", { class: "name" });
    name.appendChild(el("code", {}, d.job_id));
    row.appendChild(name);
    row.appendChild(el("td", {}, d.kind));
    row.appendChild(el("td", {}, d.provider || "-"));
    const status = el("td", { class: "status" });
    status.appendChild(el("span", { class: "status" }));
    row.appendChild(status);
    row.appendChild(el("td", { class: "phase" }));
    const progress = el("td", { class: "progress" });
    progress.appendChild(el("progress", { max: "100", value: "0" }));
    progress.appendChild(document.createTextNode(" "));
    progress.appendChild(el("span", { class: "pct" }));
    row.appendChild(progress);
    for (const css of ["heartbeat", "items", "failed-items", "actions"]) row.appendChild(el("td", { class: css }));
    return row;
  }

  function onJob(d) {
    const tbody = document.querySelector('tbody[data-kind="job"]');
    let row = findRow(d.item);
    if (!row) {
      row = jobRow(d);
      tbody.insertBefore(row, tbody.firstChild);
      clearEmpty(tbody);
    }
    row.dataset.heartbeatAt = d.heartbeat_at === null ? "" : d.heartbeat_at;
    row.dataset.status = d.status;
    const span = cell(row, "status").querySelector("span");
    span.textContent = d.status;
    span.className = "status " + d.status;
    cell(row, "phase").textContent = d.phase || "-";
    cell(row, "progress").querySelector("progress").value = d.progress;
    cell(row, "progress").querySelector(".pct").textContent = Math.floor(d.progress) + "%";
    cell(row, "items").textContent = d.items.ok + "/" + d.items.total + " ok";
    const failed = d.failed.map((f) => f.item + ": " + f.reason).join(", ");
    cell(row, "failed-items").textContent = failed || d.error || "-";
    const actions = cell(row, "actions");
    actions.replaceChildren();
    if (d.cancellable) actions.appendChild(form("/ui/jobs/" + d.job_id + "/cancel", "Cancel", {}, "cancel"));
    if (d.retryable) actions.appendChild(form("/ui/jobs/" + d.job_id + "/retry", "Retry", {}, "retry"));
    tick();
  }

  // -- service -----------------------------------------------------------------------

  function onService(d) {
    const dl = findRow("service");
    if (!dl) return;
    dl.dataset.started = d.started;
    dl.querySelector(".degraded").textContent = d.degraded_parts.join(", ") || "no";
    dl.querySelector(".store").textContent = d.store;
    dl.querySelector(".key_id").textContent = d.key_id || "none";
    dl.querySelector(".version").textContent = d.version;
  }

  // -- relative times, once a second --------------------------------------------------

  function tick() {
    const t = now();
    for (const row of document.querySelectorAll('tr[data-item^="provider:"]')) {
      const expires = num(row.dataset.expiresAt);
      const refreshed = num(row.dataset.lastRefresh);
      cell(row, "expires").textContent = expires === null ? "-" : ago(expires - t);
      cell(row, "refreshed").textContent = refreshed === null ? "-" : ago(t - refreshed) + " ago";
    }
    for (const row of document.querySelectorAll('tr[data-item^="job:"]')) {
      const beat = num(row.dataset.heartbeatAt);
      cell(row, "heartbeat").textContent = beat === null ? "-" : ago(t - beat) + " ago";
    }
    const service = findRow("service");
    if (service) service.querySelector(".uptime").textContent = ago(t - num(service.dataset.started));
  }

  // -- the stream --------------------------------------------------------------------

  const live = document.getElementById("live");
  const handlers = { provider: onProvider, pool: onPool, job: onJob, service: onService };
  const source = new EventSource("/v1/events");
  source.addEventListener("open", () => {
    live.textContent = "live";
    live.className = "live on";
  });
  source.addEventListener("error", () => {
    live.textContent = source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…";
    live.className = "live off";
  });
  for (const [name, handler] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handler(JSON.parse(event.data)));
  }
  setInterval(tick, 1000);

  // -- buttons: POST with the CSRF header, show the outcome in the row ------------------

  function note(formNode, text) {
    const row = formNode.closest("tr");
    const target = row && row.querySelector(".note");
    if (target) target.textContent = text;
  }

  async function findAuthorizeUrl(jobId) {
    for (let i = 0; i < 20; i++) {
      const answer = await fetch("/ui/jobs/" + encodeURIComponent(jobId), {
        headers: { Accept: "application/json" }, credentials: "same-origin",
      });
      if (!answer.ok) return null;
      const body = await answer.json();
      if (body.authorize_url) return body.authorize_url;
      if (["done", "failed", "partial", "canceled"].includes(body.job.status)) return null;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    return null;
  }

  document.addEventListener("submit", async (event) => {
    const f = event.target;
    const action = f.getAttribute("action") || "";
    if (!action.startsWith("/ui/jobs")) return;
    event.preventDefault();
    const authorize = f.querySelector('input[name="kind"]')?.value === "authorize";
    // Opened now, while the click counts as a user gesture, so no popup blocker stops it.
    const popup = authorize ? window.open("", "_blank") : null;
    note(f, "…");
    let answer;
    try {
      answer = await fetch(action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, Accept: "application/json" },
        body: new URLSearchParams(new FormData(f)),
      });
    } catch (err) {
      if (popup) popup.close();
      note(f, "network error");
      return;
    }
    const body = await answer.json().catch(() => ({}));
    if (!answer.ok) {
      if (popup) popup.close();
      const code = body.error && body.error.code;
      note(f, code === "unknown_job_kind"
        ? "Re-authorisation is not available on this server yet."
        : "refused (" + (code || answer.status) + ")");
      return;
    }
    if (body.job) {
      onJob({ item: "job:" + body.job.job_id, ...body.job });
      note(f, body.job.kind + " job " + body.job.job_id + " started");
    }
    if (authorize && body.job) {
      const url = body.authorize_url || (await findAuthorizeUrl(body.job.job_id));
      if (url && popup) {
        popup.opener = null;
        popup.location.href = url;
      } else if (url) {
        note(f, "open " + url);
      } else {
        if (popup) popup.close();
        note(f, "the authorize job gave no URL");
      }
    }
  });

  tick();
})();
