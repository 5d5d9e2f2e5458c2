/// The dashboard's page, style and script, served by the coordinator itself (no third-party code, nothing fetched
/// from elsewhere). The script reads `/dashboard/api/*` every few seconds and draws its plots as SVG.
enum DashboardAssets {
    static let html = """
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>Whittle coordinator</title>
        <link rel="stylesheet" href="/dashboard/app.css">
        </head>
        <body>
        <header>
          <h1>Whittle</h1>
          <span id="summary">loading…</span>
          <span id="updated"></span>
        </header>
        <main>
          <section>
            <h2>Workers</h2>
            <table id="workers"><thead><tr>
              <th>name</th><th>state</th><th>last seen</th><th>samples</th><th>labels</th><th>held-out</th>
              <th>cores</th><th>memory limit</th><th>version</th><th>address</th><th>certificate until</th>
            </tr></thead><tbody></tbody></table>
          </section>
          <section>
            <h2>Rounds</h2>
            <table id="rounds"><thead><tr>
              <th>round</th><th>state</th><th>started</th><th>progress</th><th>phase</th><th>working</th><th>plan</th>
            </tr></thead><tbody></tbody></table>
          </section>
          <section id="detail" hidden>
            <h2>Round <span id="detail-id"></span> <small id="detail-state"></small></h2>
            <p id="detail-message"></p>
            <div class="plots">
              <figure>
                <figcaption>Accuracy versus model size: every finished round (fleet), and each site before → after</figcaption>
                <div id="tradeoff"></div>
              </figure>
              <figure>
                <figcaption>Phases: wall time (bar) and reports accepted</figcaption>
                <div id="timeline"></div>
              </figure>
            </div>
            <figure id="search-box" hidden>
              <figcaption>Architecture search: every candidate scored by the fleet (after re-estimating its batch norm
              on each board's data) against its cost; the front, the uniform widths (reference) and the choice</figcaption>
              <div id="search"></div>
            </figure>
            <h3>Per-site before / after</h3>
            <table id="sites"><thead><tr>
              <th>site</th><th>samples</th><th>labels</th><th>phases</th><th>accuracy before</th><th>accuracy after</th>
              <th>agreement</th><th>task figure</th><th>latency before</th><th>latency after</th><th>speed-up</th><th>up</th><th>down</th><th>received</th>
            </tr></thead><tbody></tbody></table>
            <h3>Model</h3>
            <table id="figures"><thead><tr><th></th><th>before</th><th>after</th><th>ratio</th></tr></thead><tbody></tbody></table>
          </section>
        </main>
        <script src="/dashboard/app.js"></script>
        </body>
        </html>
        """

    static let loginPage = """
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><title>Whittle: login needed</title>
        <link rel="stylesheet" href="/dashboard/app.css"></head>
        <body><main><h1>Whittle</h1>
        <p>This dashboard needs a session. On the coordinator's host, run</p>
        <pre>coordinator dashboard --dir DIR</pre>
        <p>and open the one-time link it prints (valid for 10 minutes), or use a browser holding the admin certificate.</p>
        </main></body></html>
        """

    static let style = """
        body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
        header { display: flex; gap: 1.5em; align-items: baseline; padding: 0.8em 1.5em; background: #1d2330; color: #fff; }
        header h1 { margin: 0; font-size: 1.3em; }
        #updated { margin-left: auto; opacity: 0.7; font-size: 0.9em; }
        main { padding: 0.5em 1.5em 2em; }
        section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 0.6em 1em 1em; margin: 1em 0; }
        h2 { font-size: 1.1em; margin: 0.4em 0 0.6em; } h3 { font-size: 1em; margin: 1.2em 0 0.4em; }
        table { border-collapse: collapse; width: 100%; }
        th, td { text-align: left; padding: 0.25em 0.6em; border-bottom: 1px solid #edf0f3; white-space: nowrap; }
        th { font-weight: 600; color: #566; font-size: 0.9em; }
        td.num { text-align: right; font-variant-numeric: tabular-nums; }
        tr.selectable { cursor: pointer; } tr.selectable:hover, tr.selected { background: #eef4ff; }
        .state { padding: 0.05em 0.5em; border-radius: 1em; font-size: 0.85em; }
        .online, .succeeded, .done { background: #dcf5e3; color: #14642e; }
        .offline, .cancelled, .pending { background: #eceef1; color: #555; }
        .running, .enrolled { background: #dde9ff; color: #1a4fb3; }
        .failed, .revoked, .expired { background: #fde2e1; color: #a1201b; }
        .bar { width: 140px; height: 8px; background: #edf0f3; border-radius: 4px; overflow: hidden; display: inline-block; }
        .bar > span { display: block; height: 100%; background: #3b6fe0; }
        .plots { display: flex; flex-wrap: wrap; gap: 1.5em; }
        figure { margin: 0; } figcaption { font-size: 0.9em; color: #566; margin-bottom: 0.3em; }
        svg text { font: 11px system-ui, sans-serif; fill: #444; }
        .better { color: #14642e; } .worse { color: #a1201b; }
        pre { background: #eceef1; padding: 0.5em 1em; display: inline-block; }
        """

    static let script = #"""
        "use strict";
        const SVG = "http://www.w3.org/2000/svg";
        let selected = null;

        function el(tag, attrs, text) {
          const node = document.createElement(tag);
          for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
          if (text !== undefined && text !== null) node.textContent = text;
          return node;
        }
        function svg(tag, attrs, text) {
          const node = document.createElementNS(SVG, tag);
          for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
          if (text !== undefined) node.textContent = text;
          return node;
        }
        function cell(row, text, cls) { const td = el("td", cls ? { class: cls } : {}, text); row.appendChild(td); return td; }
        function badge(state) { return el("span", { class: "state " + state }, state); }
        function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(2) + " %"; }
        function ms(x) { return x === null || x === undefined ? "–" : x.toFixed(2) + " ms"; }
        function bytes(n) {
          if (n === null || n === undefined) return "–";
          const units = ["B", "KiB", "MiB", "GiB"]; let i = 0;
          while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
          return (i ? n.toFixed(1) : n) + " " + units[i];
        }
        function ago(iso) {
          if (!iso) return "never";
          const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
          if (s < 90) return Math.round(s) + " s ago";
          if (s < 5400) return Math.round(s / 60) + " min ago";
          return Math.round(s / 3600) + " h ago";
        }
        async function get(path) {
          const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
          if (!response.ok) throw new Error(path + ": " + response.status);
          return response.json();
        }

        function renderWorkers(workers) {
          const body = document.querySelector("#workers tbody");
          body.replaceChildren();
          for (const w of workers) {
            const c = w.capabilities || {};
            const row = el("tr");
            cell(row, w.name);
            row.appendChild(el("td")).appendChild(badge(w.state));
            cell(row, ago(w.lastContactAt));
            cell(row, c.samples ?? "–", "num");
            cell(row, c.labels === undefined ? "–" : (c.labels ? "yes" : "no"));
            cell(row, c.evaluationSamples ?? "–", "num");
            cell(row, c.cores ?? "–", "num");
            cell(row, c.memoryLimitBytes ? bytes(c.memoryLimitBytes) : "none");
            cell(row, c.version ?? "–");
            cell(row, w.address ?? "–");
            cell(row, (w.certificateExpiresAt || "").slice(0, 10));
            body.appendChild(row);
          }
        }

        function planSummary(p) {
          const parts = [];
          if (p.pruneRatio > 0 || (p.schedule || []).length) parts.push("prune " + ((p.schedule || []).length ? p.schedule.join("→") : p.pruneRatio) + " " + p.importance);
          if (p.search) {
            const b = p.search.budget || {}, limits = [];
            if (b.macs != null) limits.push((b.macs / 1e6).toFixed(2) + "M MACs");
            if (b.parameterBytes != null) limits.push(bytes(b.parameterBytes));
            if (b.latencyMs != null) limits.push(b.latencyMs + " ms");
            if (p.search.latencyShare != null) limits.push((100 * p.search.latencyShare).toFixed(0) + "% latency");
            parts.push("search " + p.search.candidates + " ≤ " + limits.join(", "));
          }
          if (p.finetuneRounds > 0) parts.push(p.finetuneRounds + "×" + p.localEpochs + " FedAvg" + (p.distill ? " + distill" : ""));
          if (p.quantize !== "none") parts.push(p.quantize + " " + p.calibration);
          parts.push("≥" + p.minWorkers + " workers");
          if (p.secureAggregation) parts.push("secure aggregation");
          if (p.privacy) parts.push("DP ε " + p.privacy.epsilon);
          return parts.join(", ");
        }

        function renderRounds(rounds) {
          const body = document.querySelector("#rounds tbody");
          body.replaceChildren();
          for (const r of rounds) {
            const row = el("tr", { class: "selectable" + (r.id === selected ? " selected" : "") });
            row.addEventListener("click", () => { selected = r.id; refresh(); });
            cell(row, r.id);
            row.appendChild(el("td")).appendChild(badge(r.state));
            cell(row, (r.createdAt || "").replace("T", " ").slice(0, 19));
            const done = r.phases.filter(p => p.state === "done").length;
            const bar = el("span", { class: "bar" }); const fill = el("span");
            fill.style.width = (100 * done / Math.max(1, r.phaseCount)) + "%";
            bar.appendChild(fill);
            const progress = row.appendChild(el("td")); progress.appendChild(bar);
            progress.appendChild(document.createTextNode(" " + done + "/" + r.phaseCount));
            cell(row, r.state === "running" ? r.phaseLabel : (r.message || "–"));
            cell(row, r.state === "running" ? r.assigned : "–", "num");
            cell(row, planSummary(r.plan));
            body.appendChild(row);
          }
        }

        // Accuracy (y) against model size (x, log scale): each finished round's fleet figures (before and after,
        // joined), and each site of the selected round (before → after at the two model sizes).
        function renderTradeoff(reports, report) {
          const W = 560, H = 340, L = 56, R = 16, T = 14, B = 44;
          const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "accuracy versus size" });
          const points = [];
          for (const r of reports) {
            for (const side of ["before", "after"]) if (r[side] && r[side].accuracy != null) points.push([r[side].bytes, r[side].accuracy]);
          }
          for (const s of (report && report.sites) || []) {
            const before = s.accuracyBefore ?? null, after = s.accuracyAfter ?? s.agreement ?? null;
            if (before != null) points.push([report.before.bytes, before]);
            if (after != null) points.push([report.after.bytes, after]);
          }
          if (!points.length) { root.appendChild(svg("text", { x: L, y: H / 2 }, "no finished round yet")); return root; }
          let [x0, x1] = [Math.min(...points.map(p => p[0])), Math.max(...points.map(p => p[0]))];
          x0 = Math.log10(x0 / 1.6); x1 = Math.log10(x1 * 1.6);
          let [y0, y1] = [Math.min(...points.map(p => p[1])), Math.max(...points.map(p => p[1]))];
          y0 = Math.max(0, y0 - 0.03); y1 = Math.min(1, y1 + 0.02);
          const X = b => L + (Math.log10(b) - x0) / (x1 - x0) * (W - L - R);
          const Y = a => T + (1 - (a - y0) / Math.max(1e-9, y1 - y0)) * (H - T - B);
          root.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fbfcfd", stroke: "#dde1e7" }));
          for (let k = 0; k <= 5; k++) {
            const a = y0 + (y1 - y0) * k / 5;
            root.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(a), y2: Y(a), stroke: "#edf0f3" }));
            root.appendChild(svg("text", { x: L - 6, y: Y(a) + 4, "text-anchor": "end" }, (100 * a).toFixed(1) + "%"));
          }
          for (let e = Math.ceil(x0 * 2) / 2; e <= x1; e += 0.5) {
            root.appendChild(svg("line", { x1: X(10 ** e), x2: X(10 ** e), y1: T, y2: H - B, stroke: "#edf0f3" }));
            root.appendChild(svg("text", { x: X(10 ** e), y: H - B + 16, "text-anchor": "middle" }, bytes(Math.round(10 ** e))));
          }
          root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" }, "model file size (log scale)"));
          root.appendChild(svg("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle" }, "accuracy"));
          for (const s of (report && report.sites) || []) {
            const before = s.accuracyBefore ?? null, after = s.accuracyAfter ?? s.agreement ?? null;
            if (before == null || after == null) continue;
            root.appendChild(svg("line", { x1: X(report.before.bytes), y1: Y(before), x2: X(report.after.bytes), y2: Y(after),
                                            stroke: "#9bb5ec", "stroke-dasharray": "3 3" }));
            root.appendChild(svg("circle", { cx: X(report.before.bytes), cy: Y(before), r: 3.5, fill: "#9bb5ec", class: "site" }));
            const dot = svg("circle", { cx: X(report.after.bytes), cy: Y(after), r: 3.5, fill: "#3b6fe0", class: "site" });
            dot.appendChild(svg("title", {}, s.worker + ": " + pct(before) + " → " + pct(after)));
            root.appendChild(dot);
          }
          for (const r of reports) {
            if (!r.before || !r.after || r.before.accuracy == null || r.after.accuracy == null) continue;
            const mine = report && r.round === report.round;
            root.appendChild(svg("line", { x1: X(r.before.bytes), y1: Y(r.before.accuracy), x2: X(r.after.bytes), y2: Y(r.after.accuracy),
                                            stroke: mine ? "#e0663b" : "#c9ccd2", "stroke-width": mine ? 2 : 1 }));
            root.appendChild(svg("circle", { cx: X(r.before.bytes), cy: Y(r.before.accuracy), r: 6, fill: "#1d2330", class: "fleet" }));
            const dot = svg("circle", { cx: X(r.after.bytes), cy: Y(r.after.accuracy), r: 6, fill: mine ? "#e0663b" : "#8c93a0", class: "fleet" });
            dot.appendChild(svg("title", {}, r.round + ": " + bytes(r.after.bytes) + ", " + pct(r.after.accuracy)));
            root.appendChild(dot);
            if (mine) root.appendChild(svg("text", { x: X(r.after.bytes) + 9, y: Y(r.after.accuracy) + 4 },
              (r.before.bytes / r.after.bytes).toFixed(1) + "× smaller, " + (100 * (r.after.accuracy - r.before.accuracy)).toFixed(2) + " pts"));
          }
          const legend = [["#1d2330", "base model (fleet)"], ["#e0663b", "compressed (fleet)"], ["#3b6fe0", "compressed (site)"]];
          legend.forEach(([color, label], k) => {
            // Bottom right: large and inaccurate, where no model worth keeping sits.
            root.appendChild(svg("circle", { cx: W - R - 130, cy: H - B - 52 + 16 * k, r: 5, fill: color }));
            root.appendChild(svg("text", { x: W - R - 120, y: H - B - 48 + 16 * k }, label));
          });
          return root;
        }

        // The search's candidates: fleet accuracy (or agreement, or negated loss) after adaptive batch norm (y)
        // against predicted latency on the slowest kind of board, or MACs (x); the front joined, the uniform
        // architecture and the chosen one marked, each candidate's widths in its tooltip.
        function renderSearch(report) {
          const s = report && report.search, box = document.getElementById("search-box");
          box.hidden = !s;
          if (!s) return null;
          const byLatency = s.candidates.length > 0 && s.candidates.every(c => c.latencyMs != null);
          const cost = c => byLatency ? c.latencyMs : c.macs;
          const figure = c => c.accuracy ?? c.agreement ?? (c.loss != null ? -c.loss : null);
          const shown = s.candidates.filter(c => figure(c) != null);
          const W = 560, H = 300, L = 56, R = 16, T = 14, B = 44;
          const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "architecture search" });
          if (!shown.length) { root.appendChild(svg("text", { x: L, y: H / 2 }, "no candidate was scored")); return root; }
          let [x0, x1] = [Math.min(...shown.map(cost)), Math.max(...shown.map(cost))];
          let [y0, y1] = [Math.min(...shown.map(figure)), Math.max(...shown.map(figure))];
          const dx = Math.max(1e-9, x1 - x0) * 0.05, dy = Math.max(1e-9, y1 - y0) * 0.08;
          x0 -= dx; x1 += dx; y0 -= dy; y1 += dy;
          const X = v => L + (v - x0) / (x1 - x0) * (W - L - R);
          const Y = v => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
          root.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fbfcfd", stroke: "#dde1e7" }));
          const percent = shown.every(c => c.accuracy != null || c.agreement != null);
          for (let k = 0; k <= 4; k++) {
            const v = y0 + (y1 - y0) * k / 4, u = x0 + (x1 - x0) * k / 4;
            root.appendChild(svg("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, percent ? (100 * v).toFixed(1) + "%" : v.toFixed(3)));
            root.appendChild(svg("text", { x: X(u), y: H - B + 16, "text-anchor": "middle" }, byLatency ? u.toFixed(3) + " ms" : (u / 1e6).toFixed(2) + "M"));
          }
          root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" },
            byLatency ? (s.candidates.some(c => c.kind) ? "predicted latency on the kind of board each was proposed for" : "predicted latency on the slowest kind of board") : "MACs per sample"));
          const limit = byLatency ? s.budget.latencyMs : s.budget.macs;
          if (limit != null && limit >= x0 && limit <= x1) {
            root.appendChild(svg("line", { x1: X(limit), x2: X(limit), y1: T, y2: H - B, stroke: "#e0663b", "stroke-dasharray": "4 3", class: "budget" }));
          }
          const widths = c => Object.entries(c.widths).map(([k, v]) => k.replace(/^\//, "").replace(/\/(Conv|Gemm|MatMul|ConvTranspose)$/, "") + "=" + v).join(" ");
          for (const c of shown) {
            const dot = svg("circle", { cx: X(cost(c)), cy: Y(figure(c)), r: 3, fill: "#b7bcc6", class: "candidate" });
            dot.appendChild(svg("title", {}, widths(c) + " · loss " + (c.loss ?? NaN).toFixed(4)));
            root.appendChild(dot);
          }
          const front = s.front.filter(c => figure(c) != null);
          if (front.length > 1) root.appendChild(svg("polyline", { points: front.map(c => X(cost(c)) + "," + Y(figure(c))).join(" "),
                                                                  fill: "none", stroke: "#3b6fe0", "stroke-width": 1.5, class: "front" }));
          for (const [c, color, cls, label] of [[s.uniform, "#1d2330", "uniform", "uniform widths"], [s.chosen, "#e0663b", "chosen", "chosen"]]) {
            if (!c || figure(c) == null) continue;
            const dot = svg("circle", { cx: X(cost(c)), cy: Y(figure(c)), r: 6, fill: color, class: cls });
            dot.appendChild(svg("title", {}, label + ": " + widths(c)));
            root.appendChild(dot);
          }
          const legend = [["#1d2330", "uniform widths (reference)"], ["#e0663b", "chosen (lowest fleet loss)"], ["#3b6fe0", "front (fleet loss against cost)"], ["#b7bcc6", "other candidates"]];
          legend.forEach(([color, label], k) => {
            root.appendChild(svg("circle", { cx: W + 14, cy: T + 8 + 16 * k, r: 5, fill: color }));
            root.appendChild(svg("text", { x: W + 24, y: T + 12 + 16 * k }, label));
          });
          // One model per kind of board: which round makes each.
          (s.models || []).forEach((m, k) => {
            const y = T + 12 + 16 * (legend.length + 1 + 2 * k);
            root.appendChild(svg("text", { x: W + 10, y, class: "kind-model" }, m.kinds.join(" + ")));
            const ms = m.kinds.map(kind => (m.latencyMs[kind] ?? NaN).toFixed(2) + " ms").join(", ");
            root.appendChild(svg("text", { x: W + 18, y: y + 14 }, (m.macs / 1e6).toFixed(2) + "M MACs, " + ms + (m.round ? " · " + m.round : "")));
          });
          if ((s.untimed || []).length) {
            const y = T + 12 + 16 * (legend.length + 1 + 2 * (s.models || []).length);
            root.appendChild(svg("text", { x: W + 10, y, class: "untimed" }, "not timed: " + s.untimed.join(", ")));
          }
          const rows = legend.length + 2 + 2 * (s.models || []).length + ((s.untimed || []).length ? 1 : 0);
          const height = Math.max(H, T + 16 * rows + 8);
          root.setAttribute("width", W + 220);
          root.setAttribute("height", height);
          root.setAttribute("viewBox", `0 0 ${W + 220} ${height}`);
          return root;
        }

        function renderTimeline(round) {
          const rows = round.phases, W = 560, bar = 16, T = 8, L = 190, H = T + rows.length * (bar + 4) + 24;
          const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "phase timeline" });
          const durations = rows.map(p => (p.startedAt && p.endedAt) ? p.endedAt - p.startedAt : (p.startedAt ? Date.now() / 1000 - p.startedAt : 0));
          const longest = Math.max(1e-3, ...durations);
          rows.forEach((p, k) => {
            const y = T + k * (bar + 4);
            root.appendChild(svg("text", { x: L - 8, y: y + bar - 4, "text-anchor": "end" }, p.label));
            const width = Math.max(1, (W - L - 90) * durations[k] / longest);
            const color = p.state === "done" ? "#3b6fe0" : p.state === "running" ? "#e0a23b" : "#dde1e7";
            const rect = svg("rect", { x: L, y, width, height: bar, fill: color, rx: 2, class: "phase" });
            rect.appendChild(svg("title", {}, p.label + ": " + durations[k].toFixed(1) + " s, " + p.reports + " reports, " + p.refused + " refused"));
            root.appendChild(rect);
            root.appendChild(svg("text", { x: L + width + 6, y: y + bar - 4 }, durations[k].toFixed(1) + " s · " + p.reports));
          });
          return root;
        }

        function renderSites(report, round) {
          const body = document.querySelector("#sites tbody");
          body.replaceChildren();
          for (const s of (report ? report.sites : round.sites)) {
            const row = el("tr");
            cell(row, s.worker);
            cell(row, s.samples, "num");
            cell(row, s.labels ? "yes" : "no");
            cell(row, s.phasesServed, "num");
            cell(row, pct(s.accuracyBefore), "num");
            const after = cell(row, pct(s.accuracyAfter), "num");
            if (s.accuracyBefore != null && s.accuracyAfter != null) after.classList.add(s.accuracyAfter >= s.accuracyBefore ? "better" : "worse");
            cell(row, pct(s.agreement), "num");
            // The task's own figure: mean IoU for segmenters, cosine for embeddings, relative error otherwise.
            cell(row, s.meanIoUAfter != null ? "mIoU " + pct(s.meanIoUBefore) + " → " + pct(s.meanIoUAfter)
                    : s.meanCosine != null ? "cosine " + s.meanCosine.toFixed(4)
                    : s.relativeError != null ? "rel. error " + s.relativeError.toFixed(4) : "–", "num");
            cell(row, ms(s.latencyBeforeMs), "num");
            cell(row, ms(s.latencyAfterMs), "num");
            // Median speed-up at batch 1 and at the working batch; medians and 90th percentiles in the tooltip.
            const timed = s.latency || [];
            const speedup = timed.map(l => (l.base.p50Ms / l.compressed.p50Ms).toFixed(2) + "×" + (l.batch > 1 ? " @" + l.batch : "")).join(" · ");
            const up = cell(row, speedup || "–", "num");
            up.title = timed.map(l => "batch " + l.batch + ", " + l.runs + " runs: before " + l.base.p50Ms.toFixed(3) + " ms (p90 "
                + l.base.p90Ms.toFixed(3) + "), after " + l.compressed.p50Ms.toFixed(3) + " ms (p90 " + l.compressed.p90Ms.toFixed(3) + ")").join("\n")
                + (s.cpu ? "\n" + s.cpu + ", " + s.threads + " threads pinned" : "");
            if (timed.length) up.classList.add(timed[0].base.p50Ms >= timed[0].compressed.p50Ms ? "better" : "worse");
            cell(row, bytes(s.bytesUp), "num");
            cell(row, bytes(s.bytesDown), "num");
            cell(row, s.received ? "yes" : "no");
            body.appendChild(row);
          }
          const figures = document.querySelector("#figures tbody");
          figures.replaceChildren();
          if (!report) return;
          const rows = [["file size", "bytes", bytes], ["parameters", "parameters", String], ["MACs", "macs", String],
                        [report.task === "segmentation" ? "pixel accuracy" : "accuracy", "accuracy", pct]];
          if (report.after.meanIoU != null) rows.push(["mean IoU", "meanIoU", pct]);
          for (const [label, key, format] of rows) {
            const row = el("tr"), b = report.before[key], a = report.after[key];
            cell(row, label); cell(row, format(b), "num"); cell(row, format(a), "num");
            cell(row, format === pct ? (b != null && a != null ? (100 * (a - b)).toFixed(2) + " pts" : "–") : (a ? (b / a).toFixed(2) + "×" : "–"), "num");
            figures.appendChild(row);
          }
          if (report.speedup) {
            const row = el("tr"), f = report.speedup;
            cell(row, "speed-up on the boards"); cell(row, ""); cell(row, f.batchOne.toFixed(2) + "× at batch 1"
                + (f.workingBatch != null ? ", " + f.workingBatch.toFixed(2) + "× at the working batch" : ""), "num");
            cell(row, "geometric mean of " + f.sites + " site" + (f.sites === 1 ? "" : "s"), "num");
            figures.appendChild(row);
          }
          if (report.secureAggregation) {
            // What the coordinator saw: sums only; who was asked, who dropped out.
            const s = report.secureAggregation, row = el("tr");
            const dropped = s.sums.reduce((n, x) => n + x.dropped.length, 0);
            cell(row, "secure aggregation"); cell(row, "");
            cell(row, s.parties.length + " parties, " + s.neighbours + " neighbours each, threshold " + s.threshold, "num");
            cell(row, s.sums.length + " sums, " + dropped + " dropout" + (dropped === 1 ? "" : "s"), "num");
            figures.appendChild(row);
          }
          if (report.privacy) {
            const p = report.privacy, row = el("tr"), sites = Object.entries(p.sites || {});
            const most = sites.reduce((m, [, e]) => Math.max(m, e), 0);
            cell(row, "differential privacy"); cell(row, "");
            cell(row, "ε " + p.epsilon.toFixed(3) + " at δ " + p.delta + " (noise ×" + p.noiseMultiplier.toFixed(3) + ", clip " + p.clipNorm + ")", "num");
            const c = cell(row, sites.length ? "sites so far: ε ≤ " + most.toFixed(3) : "", "num");
            c.title = sites.map(([w, e]) => w + ": ε " + e.toFixed(3)).join("\n");
            figures.appendChild(row);
          }
          const against = [];
          if (report.agreement != null) against.push("agreement " + pct(report.agreement));
          if (report.relativeError != null) against.push("relative error " + report.relativeError.toFixed(4));
          if (report.meanCosine != null) against.push("mean cosine " + report.meanCosine.toFixed(4));
          if (against.length) {
            const row = el("tr");
            cell(row, "vs base (" + (report.task || "classification") + ")"); cell(row, ""); cell(row, against.join(", "), "num"); cell(row, "");
            figures.appendChild(row);
          }
        }

        const reportCache = {};
        async function reportOf(round) {
          if (round.state !== "succeeded") return null;
          if (!reportCache[round.id]) reportCache[round.id] = await get("/dashboard/api/rounds/" + encodeURIComponent(round.id) + "/report");
          return reportCache[round.id];
        }

        async function refresh() {
          try {
            const [workers, rounds] = await Promise.all([get("/dashboard/api/workers"), get("/dashboard/api/rounds")]);
            const online = workers.filter(w => w.state === "online").length;
            const running = rounds.filter(r => r.state === "running").length;
            document.getElementById("summary").textContent =
              `${workers.length} workers (${online} online) · ${rounds.length} rounds (${running} running)`;
            renderWorkers(workers);
            if (!selected && rounds.length) selected = (rounds.find(r => r.state === "running") || rounds.find(r => r.state === "succeeded") || rounds[0]).id;
            renderRounds(rounds);
            const round = rounds.find(r => r.id === selected);
            const detail = document.getElementById("detail");
            detail.hidden = !round;
            if (round) {
              const reports = [];
              for (const r of rounds) { const rep = await reportOf(r); if (rep) reports.push(rep); }
              const report = reports.find(r => r.round === round.id) || null;
              document.getElementById("detail-id").textContent = round.id;
              document.getElementById("detail-state").replaceChildren(badge(round.state));
              document.getElementById("detail-message").textContent = round.message || (round.state === "running" ? "at " + round.phaseLabel : "");
              document.getElementById("tradeoff").replaceChildren(renderTradeoff(reports, report));
              document.getElementById("timeline").replaceChildren(renderTimeline(round));
              const search = renderSearch(report);
              document.getElementById("search").replaceChildren(...(search ? [search] : []));
              renderSites(report, round);
            }
            document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
          } catch (error) {
            document.getElementById("updated").textContent = "update failed: " + error.message;
          }
        }
        refresh();
        setInterval(refresh, 5000);
        """#
}
