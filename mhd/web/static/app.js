// mhd's page: a thin view over the daemon's JSON.
// /api/events pushes the status snapshot (the same dict `mhd status --json` prints) about every
// second; the cheap parts (state, step, ETA, cost) are redrawn from each snapshot. The heavier parts
// (journal, server-rendered SVG charts, run table) are fetched again only when the snapshot says
// something they show has changed, plus a slow periodic refresh as a safety net.
"use strict";

(function () {
  const HAPPY = ["Provisioning", "Connecting", "Uploading", "Training", "Fetching", "Merging", "Idle"];
  const DETAILS_MAX_AGE_MS = 15000;
  const STALE_MS = 8000;
  const POLL_MS = 2000;
  const CLOCK = { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
  const DAY = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hour12: false };

  const $ = (id) => document.getElementById(id);
  const view = {
    status: null, key: "", detailsAt: 0, busy: false, again: false,
    lastMessageAt: 0, svg: {}, journal: [], polling: false,
  };

  // Formatting -------------------------------------------------------------------------------
  function dur(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
  }
  function usd(v) {
    if (v === null || v === undefined) return "–";
    return "$" + (v > 0 && v < 1 ? v.toFixed(3) : v.toFixed(2));
  }
  function clock(t) {
    if (!t) return "–";
    return new Date(t * 1000).toLocaleTimeString([], CLOCK);
  }
  function when(t) {
    if (!t) return "–";
    const d = new Date(t * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? clock(t) : d.toLocaleString([], DAY);
  }
  function ago(t) {
    return t ? dur(Date.now() / 1000 - t) + " ago" : "";
  }
  function mib(v) {
    if (v === null || v === undefined) return "–";
    return v >= 1024 ? (v / 1024).toFixed(1) + " GiB" : Math.round(v) + " MiB";
  }
  function memPair(used, total) {
    // "10.5/24.0 GiB": one unit for both keeps the fact short enough for one line.
    if (used === null || used === undefined || !total) return mib(used);
    return total >= 1024 ? `${(used / 1024).toFixed(1)}/${(total / 1024).toFixed(1)} GiB`
      : `${Math.round(used)}/${Math.round(total)} MiB`;
  }
  function fixed(v, digits) {
    return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
  }

  // DOM helpers ------------------------------------------------------------------------------
  function setText(id, text) {
    const el = $(id);
    if (el.textContent !== text) el.textContent = text;
  }
  function setFact(id, main, sub) {
    // A fact is a value and, below it, an optional smaller detail (rate, memory, phase).
    const dd = $(id);
    if (dd.dataset.main === main && dd.dataset.sub === (sub || "")) return;
    dd.dataset.main = main;
    dd.dataset.sub = sub || "";
    dd.replaceChildren(node("span", "value", main));
    if (sub) dd.appendChild(node("small", null, sub));
  }
  function node(tag, cls, text) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    if (text !== undefined && text !== null) el.textContent = String(text);
    return el;
  }
  function setLive(mode, detail) {
    const el = $("live");
    el.dataset.live = mode;
    el.textContent = { live: "live", connecting: "connecting…", reconnecting: "reconnecting…",
      polling: "live (polling)", stale: "no news from the daemon", offline: "offline" }[mode] || mode;
    el.title = detail || "";
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) throw new Error(`${url}: ${r.status} ${(await r.text()).trim()}`);
    return r.json();
  }
  async function getText(url) {
    const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r.text();
  }

  // The "now" section, from one status snapshot ----------------------------------------------
  function shownRun(st) {
    return st.run || st.last_run || null; // while idle, the page shows how the last run went
  }

  function renderStatus(st) {
    const run = shownRun(st);
    const active = !!st.run;
    const s = $("state");
    if (s.textContent !== st.state) {
      s.textContent = st.state;
      s.dataset.state = st.state;
      s.className = "state s-" + st.state.toLowerCase();
      document.title = `mhd · ${st.state}`;
    }
    setText("now-title", active ? "Now" : "Now · idle");
    setText("run-label", run ? `${active ? "run" : "last run"} ${run.id}` : "no runs yet");

    const p = (run && run.progress) || {};
    const step = p.step, total = p.total_steps;
    const phase = p.phase && p.phase !== "train" ? p.phase : "";
    setFact("step", step !== null && step !== undefined ? `${step} / ${total ?? "?"}` : "–", phase);
    const frac = total ? Math.min(1, Math.max(0, (step || 0) / total)) : 0;
    const bar = $("bar");
    bar.style.width = (frac * 100).toFixed(1) + "%";
    bar.dataset.frac = frac.toFixed(3);
    bar.classList.toggle("done", !active);

    setFact("eta", active && p.eta_s !== null && p.eta_s !== undefined ? dur(p.eta_s) : "–");
    if (active) setFact("elapsed", dur(st.elapsed_s));
    else setFact("elapsed", run ? dur(run.duration_s) : "–", run ? "whole run" : "");
    setText("cost-label", active ? "cost so far" : "cost");
    if (active) {
      setFact("cost", usd(st.cost_usd), st.cost_per_hr ? `$${st.cost_per_hr.toFixed(2)}/h` : "");
    } else {
      setFact("cost", run ? usd(run.cost_usd) : "–", run && run.billed_s ? `${dur(run.billed_s)} billed` : "");
    }
    setFact("loss-now", fixed(p.loss, 4));
    const g = st.gpu;
    if (g) {
      const util = g.gpu_util === null || g.gpu_util === undefined ? "–" : Math.round(g.gpu_util);
      setFact("gpu-now", `${util}%`, memPair(g.gpu_mem_used, g.gpu_mem_total));
    } else {
      setFact("gpu-now", active && step !== null && step !== undefined ? "no GPU" : "–");
    }
    setText("pending", `${st.pending_memories} / ${st.threshold}`);
    const pf = st.threshold ? Math.min(1, st.pending_memories / st.threshold) : 0;
    $("pending-bar").style.width = (pf * 100).toFixed(1) + "%";

    let note = "";
    if (active) {
      note = `Started ${ago(run.created_at)} by ${run.trigger} on ${run.provider}` +
        (run.gpu_type ? ` (${run.gpu_type})` : "") + ".";
      if (run.error) note += ` Last error: ${run.error}`;
    } else if (run) {
      note = `Last run ${run.outcome || run.state} ${ago(run.finished_at || run.created_at)}` +
        (run.model_name ? `, model ${run.model_name}` : "") + "." + (run.error ? ` ${run.error}` : "");
    } else {
      note = "No run yet: one starts when pending memories reach the threshold, on schedule, or with `mhd train`.";
    }
    const mw = st.merge_waiting;
    if (mw) {
      note += ` The adapter of run ${mw.run_id} waits for its merge (${mw.attempts} attempt(s); ` +
        `\`mhd merge ${mw.run_id}\` retries now): no pod is rented meanwhile.`;
    }
    const fg = st.forget;
    if (fg && fg.pending) {
      const models = (fg.models_affected || []).join(", ") || "no registered model";
      note += ` ${fg.pending} forgotten memory(ies) are still inside: ${models}; ` +
        (fg.policy === "retrain" ? "a run without them starts, then they are removed."
                                 : "`mhd forget --purge` removes them.");
    }
    if (st.next_schedule_at) note += ` Next scheduled run: ${when(st.next_schedule_at)}.`;
    setText("note", note);
    tickTimeline(st);
    setText("updated", "updated " + clock(st.time));
  }

  // Timeline: the run's journal, then the states still ahead ---------------------------------
  function renderTimeline(journal, st) {
    view.journal = journal;
    const ol = $("timeline");
    const items = [];
    const run = shownRun(st);
    const active = !!st.run;
    journal.forEach((t, i) => {
      const next = journal[i + 1];
      const current = active && !next;
      const li = node("li", "chip s-" + t.to_state.toLowerCase() + (current ? " current" : " done"));
      li.title = t.reason || "";
      li.dataset.state = t.to_state;
      if (t.preempted) li.classList.add("preempted");  // the pod was taken back: a new one follows
      li.appendChild(node("span", "name", t.to_state));
      if (t.preempted) li.appendChild(node("span", "mark", "⚡ preempted"));
      let detail;
      if (t.to_state === "Idle" && !active) {
        detail = run && run.outcome ? run.outcome : "";
        li.classList.add("outcome-" + (run && run.outcome ? run.outcome : "none"));
      } else {
        detail = clock(t.at) + " · " + dur((next ? next.at : st.time) - t.at);
      }
      const d = node("span", "when", detail);
      if (current) d.dataset.since = String(t.at);
      li.appendChild(d);
      items.push(li);
    });
    if (active && journal.length) {
      const cur = journal[journal.length - 1].to_state;
      const ahead = cur === "Aborting" ? ["Idle"] : HAPPY.slice(HAPPY.indexOf(cur) + 1);
      for (const name of ahead) {
        const li = node("li", "chip todo");
        li.appendChild(node("span", "name", name));
        li.appendChild(node("span", "when", ""));
        items.push(li);
      }
    }
    ol.replaceChildren(...items);
  }

  function tickTimeline(st) {
    // The current state's duration grows every second without refetching the journal.
    const cur = document.querySelector("#timeline .current .when");
    if (cur && cur.dataset.since) {
      const since = Number(cur.dataset.since);
      cur.textContent = clock(since) + " · " + dur(st.time - since);
    }
  }

  // Runs table ------------------------------------------------------------------------------
  function outcomeClass(r) {
    if (!r.outcome) return "active";
    if (r.outcome === "succeeded") return "ok";
    if (r.outcome === "cancelled" || r.outcome === "no_data") return "neutral";
    return "bad";
  }
  function renderRuns(runs) {
    const body = $("runs-body");
    if (!runs.length) {
      const tr = node("tr");
      const td = node("td", "muted", "no runs yet");
      td.colSpan = 11;
      tr.appendChild(td);
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...runs.map((r) => {
      const tr = node("tr");
      tr.dataset.run = r.id;
      const cells = [
        node("td", "mono", r.id),
        node("td", null, when(r.created_at)),
        node("td", null, r.trigger),
      ];
      const oc = node("td");
      const badge = node("span", "badge " + outcomeClass(r), r.outcome || r.state);
      if (r.error) badge.title = r.error;
      oc.appendChild(badge);
      if (r.events && r.events.length) oc.appendChild(node("span", "muted", " ↺".repeat(r.events.length)));
      cells.push(oc);
      cells.push(node("td", "num", dur(r.duration_s)));
      cells.push(node("td", "num", dur(r.billed_s)));
      cells.push(node("td", "num", usd(r.cost_usd)));
      cells.push(node("td", "num", r.samples ?? "–"));
      cells.push(node("td", "num", fixed(r.final_loss, 4)));
      const model = node("td", "mono", r.model_name || "–");
      if (r.model_active) model.appendChild(node("span", "badge ok small", "active"));
      cells.push(model);
      const logCell = node("td");
      const a = node("a", null, "log");
      a.href = `/runs/${encodeURIComponent(r.id)}/log`;
      logCell.appendChild(a);
      cells.push(logCell);
      tr.append(...cells);
      return tr;
    }));
  }

  // Charts: server-rendered SVG, swapped in only when it changed ------------------------------
  function swapSvg(boxId, svg) {
    if (view.svg[boxId] === svg) return;
    view.svg[boxId] = svg;
    $(boxId).innerHTML = svg; // our own server's markup; every data string in it is escaped there
  }

  // Refreshing the heavier parts --------------------------------------------------------------
  function detailsKey(st) {
    const run = shownRun(st);
    const p = (run && run.progress) || {};
    const g = st.gpu || {};
    return [run && run.id, st.state, run && run.outcome, p.step, p.phase, p.loss,
      (st.loss_history || []).length, g.gpu_util, g.gpu_mem_used].join("|");
  }

  // Mean NLL per assistant token, base / current / new, per set (shorter bar = better), then the
  // generations side by side. The numbers come from the run's eval (same as `mhd eval RUN`).
  function renderGate(data) {
    const box = $("gate-box");
    const ev = data && data.eval;
    if (!ev) { box.replaceChildren(node("p", "muted", "no evaluation for this run")); return; }
    const parts = [node("p", "gate-decision " + (ev.decision === "rejected" ? "bad" : "ok"),
      `${ev.decision}: ${ev.reason}`)];
    const sets = [["held-out memories", "heldout"], ["probe set", "probe"]];
    const values = [];
    for (const [, key] of sets) for (const m of ["base", "current", "new"]) {
      const v = ev[`${key}_nll_${m}`]; if (typeof v === "number") values.push(v);
    }
    const top = Math.max(...values, 1e-9);
    for (const [label, key] of sets) {
      const group = node("div", "gate-set");
      group.appendChild(node("h3", null, `${label} (n=${ev[key + "_count"] || 0})`));
      for (const m of ["base", "current", "new"]) {
        const v = ev[`${key}_nll_${m}`];
        if (typeof v !== "number") continue;
        const row = node("div", "gate-row");
        row.appendChild(node("span", "gate-label", m));
        const bar = node("span", "gate-bar gate-" + m);
        bar.style.width = (100 * v / top).toFixed(1) + "%";
        row.appendChild(bar);
        row.appendChild(node("span", "gate-value", v.toFixed(3)));
        group.appendChild(row);
      }
      parts.push(group);
    }
    const gens = data.generations || [];
    if (gens.length) {
      const t = node("table", "gate-gens");
      const head = node("tr");
      for (const h of ["prompt", "base", "new"]) head.appendChild(node("th", null, h));
      t.appendChild(head);
      for (const g of gens) {
        const tr = node("tr");
        for (const k of ["prompt", "base", "new"]) tr.appendChild(node("td", null, g[k] || ""));
        t.appendChild(tr);
      }
      parts.push(t);
    }
    box.replaceChildren(...parts);
  }

  async function refreshDetails() {
    if (view.busy) { view.again = true; return; }
    view.busy = true;
    const st = view.status;
    try {
      const run = shownRun(st);
      const jobs = [getJSON("/api/runs").then(renderRuns)];
      if (run) {
        const id = encodeURIComponent(run.id);
        jobs.push(getJSON(`/api/runs/${id}/journal`).then((j) => renderTimeline(j, st)));
        jobs.push(getJSON(`/api/runs/${id}/eval`).then(renderGate));
        jobs.push(getText(`/charts/${id}/loss.svg`).then((svg) => swapSvg("loss-box", svg)));
        jobs.push(getText(`/charts/${id}/gpu.svg`).then((svg) => swapSvg("gpu-box", svg)));
      } else {
        $("timeline").replaceChildren();
        $("loss-box").replaceChildren(node("p", "muted", "no run yet"));
        $("gpu-box").replaceChildren(node("p", "muted", "no run yet"));
        view.svg = {};
      }
      await Promise.all(jobs);
      view.detailsAt = Date.now();
    } catch (e) {
      view.key = ""; // try again on the next snapshot
      setLive("offline", String(e.message || e));
    } finally {
      view.busy = false;
      if (view.again) { view.again = false; refreshDetails(); }
    }
  }

  function onStatus(st) {
    view.status = st;
    view.lastMessageAt = Date.now();
    renderStatus(st);
    const key = detailsKey(st);
    if (key !== view.key || Date.now() - view.detailsAt > DETAILS_MAX_AGE_MS) {
      view.key = key;
      refreshDetails();
    }
  }

  // Transport: server-sent events, falling back to polling ------------------------------------
  function poll() {
    if (view.polling) return;
    view.polling = true;
    const tick = async () => {
      try {
        onStatus(await getJSON("/api/status"));
        setLive("polling");
      } catch (e) {
        setLive("offline", String(e.message || e));
      }
      setTimeout(tick, POLL_MS);
    };
    tick();
  }

  function connect() {
    if (!window.EventSource) { poll(); return; }
    const es = new EventSource("/api/events");
    es.onmessage = (ev) => {
      setLive("live");
      onStatus(JSON.parse(ev.data));
    };
    es.onerror = () => {
      // CONNECTING: the browser retries by itself (daemon restarting). CLOSED: it gave up
      // (e.g. 401 or a proxy that buffers streams), so ask for snapshots instead.
      if (es.readyState === EventSource.CLOSED) { poll(); } else { setLive("reconnecting"); }
    };
  }

  setInterval(() => {
    if (view.lastMessageAt && Date.now() - view.lastMessageAt > STALE_MS) setLive("stale");
  }, 1000);
  connect();
})();
