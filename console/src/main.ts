// Meridian's operator console. Everything it shows comes from the gateway's live feed
// (GET /v1/admin/console/events, server-sent events read with fetch so the admin key can
// travel in a header), and everything it does is an admin call with the key and the
// operator's name in headers. The key lives in this tab's session storage only.

import { sparkline } from "./sparkline";

interface StreamHealth {
  stream: string;
  origin: string;
  mirror: boolean;
  last_seq: number | null;
  applied: number;
  apply_lag: number | null;
  mirror_lag: number;
  active_age_ms: number | null;
  error: string | null;
}

interface RegionSample {
  region: string;
  status?: string;
  serving?: string;
  serving_for?: string[];
  epoch?: string;
  reachable: boolean;
  errors: string[];
  streams?: Record<string, StreamHealth>;
  mirror_problems?: string[];
  search?: { documents: number; lag_events: number; rebuilding: boolean; last_commit_ms: number | null };
  digest?: string;
  settled?: boolean;
  metrics?: {
    published_per_s?: number | null;
    delivered_per_s?: number | null;
    applied_per_s?: number | null;
    p99_delivery_ms?: number | null;
    lags?: Record<string, number>;
  };
}

interface Action {
  at_ms: number;
  operator: string;
  action: string;
  region: string;
  to: string;
  acting: string;
  status: number;
  outcome: string;
}

interface Sample {
  at_ms: number;
  region: string;
  regions: RegionSample[];
  convergence: { state: string; since_ms: number; detail: string };
  actions: Action[];
}

const KEY = "meridian.console.adminKey";
const OPERATOR = "meridian.console.operator";
/// Samples drawn in a sparkline (the server keeps five minutes at one a second).
const KEEP = 300;

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

let samples: Sample[] = [];
let feedAbort: AbortController | null = null;
let busy = false;

function adminKey(): string | null {
  return sessionStorage.getItem(KEY);
}
function operator(): string | null {
  return sessionStorage.getItem(OPERATOR);
}

function headers(): Record<string, string> {
  return { "X-Admin-Key": adminKey() ?? "", "X-Operator": operator() ?? "" };
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string | null)[]
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null) e.append(c);
  return e;
}

function time(ms: number): string {
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function ago(ms: number): string {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function num(v: number | null | undefined, unit = ""): string {
  if (v === null || v === undefined) return "–";
  return `${Math.round(v * 10) / 10}${unit}`;
}

// ---------------------------------------------------------------------------------------
// Sign in / out.

function showLogin(message = "") {
  feedAbort?.abort();
  $("login").hidden = false;
  for (const s of ["regions-section", "streams-section", "actions-section", "drills-section"]) $(s).hidden = true;
  $("sign-out").hidden = true;
  $("login-error").textContent = message;
  $("feed-state").textContent = "not connected";
}

function signedIn() {
  $("login").hidden = true;
  for (const s of ["regions-section", "streams-section", "actions-section", "drills-section"]) $(s).hidden = false;
  $("sign-out").hidden = false;
  $("operator-name").textContent = `operator: ${operator()}`;
  void connect();
  void loadDrills();
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $<HTMLInputElement>("admin-key").value;
  const who = $<HTMLInputElement>("operator").value.trim();
  sessionStorage.setItem(KEY, key);
  sessionStorage.setItem(OPERATOR, who);
  $<HTMLInputElement>("admin-key").value = "";
  signedIn();
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(OPERATOR);
  samples = [];
  showLogin();
});

// ---------------------------------------------------------------------------------------
// The feed: text/event-stream over fetch, reconnecting with a pause.

async function connect() {
  feedAbort?.abort();
  const abort = new AbortController();
  feedAbort = abort;
  for (let attempt = 0; !abort.signal.aborted; attempt++) {
    try {
      $("feed-state").textContent = "connecting…";
      const resp = await fetch("/v1/admin/console/events", { headers: headers(), signal: abort.signal, cache: "no-store" });
      if (resp.status === 401) {
        sessionStorage.removeItem(KEY);
        showLogin("The admin key was refused.");
        return;
      }
      if (!resp.ok || !resp.body) throw new Error(`feed answered ${resp.status}`);
      $("feed-state").textContent = "live";
      $("feed-state").className = "live";
      attempt = 0;
      await readEvents(resp.body, abort.signal);
    } catch (e) {
      if (abort.signal.aborted) return;
      $("feed-state").textContent = `feed lost (${(e as Error).message}); reconnecting`;
      $("feed-state").className = "error";
    }
    await new Promise((r) => setTimeout(r, Math.min(5000, 500 * (attempt + 1))));
  }
}

async function readEvents(body: ReadableStream<Uint8Array>, signal: AbortSignal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  signal.addEventListener("abort", () => void reader.cancel());
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("feed ended");
    buf += decoder.decode(value, { stream: true });
    let cut: number;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length === 0) continue;
      const parsed = JSON.parse(data.join("\n"));
      if (event === "history") {
        samples = (parsed.samples as Sample[]).slice(-KEEP);
      } else if (event === "sample") {
        samples.push(parsed as Sample);
        if (samples.length > KEEP) samples.shift();
      }
      render();
    }
  }
}

// ---------------------------------------------------------------------------------------
// Rendering.

function series(region: string, pick: (r: RegionSample) => number | null | undefined): (number | null)[] {
  return samples.map((s) => {
    const r = s.regions.find((x) => x.region === region);
    const v = r ? pick(r) : null;
    return v === undefined ? null : v;
  });
}

function render() {
  const last = samples[samples.length - 1];
  if (!last) return;
  $("served-by").textContent = `console · served by region ${last.region}`;
  const c = last.convergence;
  const badge = $("convergence");
  badge.dataset.state = c.state;
  badge.className = `badge ${c.state}`;
  badge.textContent =
    c.state === "converged"
      ? `converged · since ${ago(c.since_ms)} ago`
      : `not converged (${c.state.replace("_", " ")}) · since ${ago(c.since_ms)} ago`;
  badge.title = `${c.detail}; since ${time(c.since_ms)}`;
  if (!busy) renderRegions(last);
  renderStreams(last);
  renderActions(last.actions);
}

function renderRegions(last: Sample) {
  const names = last.regions.map((r) => r.region);
  const cards = last.regions.map((r) => {
    const m = r.metrics ?? {};
    const lagItems = Object.entries(m.lags ?? {}).map(([k, v]) =>
      el("li", {}, `${k.replace(/^meridian_/, "").replace(/_/g, " ")}: ${num(v)}`),
    );
    if (r.search) {
      lagItems.push(
        el(
          "li",
          { "data-field": "search" },
          `search lag: ${r.search.lag_events} events (${r.search.documents} documents${r.search.rebuilding ? ", rebuilding" : ""})`,
        ),
      );
    }
    const buttons: HTMLElement[] = [];
    if (r.status === "failed") {
      const b = el("button", { "data-action": "failback", "data-region": r.region }, `Fail back ${r.region}`);
      b.addEventListener("click", () => confirmFailback(r.region, r.serving ?? "?"));
      buttons.push(b);
    } else {
      for (const other of names.filter((n) => n !== r.region)) {
        const b = el(
          "button",
          { class: "danger", "data-action": "failover", "data-region": r.region, "data-to": other },
          `Fail over ${r.region} → ${other}`,
        );
        b.addEventListener("click", () => confirmFailover(r.region, other, r.epoch ?? "?"));
        buttons.push(b);
      }
    }
    return el(
      "article",
      { class: `region ${r.status ?? "unknown"}`, "data-region": r.region },
      el(
        "h3",
        {},
        r.region,
        " ",
        el("span", { class: `badge ${r.status ?? "unknown"}`, "data-field": "status" }, r.status ?? "unknown"),
        r.reachable ? null : el("span", { class: "badge diverged" }, "unreachable"),
      ),
      el(
        "dl",
        {},
        el("dt", {}, "users served by"),
        el("dd", { "data-field": "serving" }, r.serving ?? "–"),
        el("dt", {}, "serves for"),
        el("dd", { "data-field": "serving_for" }, (r.serving_for ?? []).join(", ") || "–"),
        el("dt", {}, "epoch"),
        el("dd", { class: "mono", title: r.epoch ?? "" }, (r.epoch ?? "–").slice(0, 12)),
        el("dt", {}, "digest"),
        el("dd", { class: "mono", "data-field": "digest", title: r.digest ?? "" }, (r.digest ?? "–").slice(0, 12) + (r.settled === false ? " (moving)" : "")),
        el("dt", {}, "sent /s"),
        el("dd", {}, el("span", { class: "v" }, num(m.published_per_s)), sparkline(series(r.region, (x) => x.metrics?.published_per_s))),
        el("dt", {}, "delivered /s"),
        el("dd", {}, el("span", { class: "v" }, num(m.delivered_per_s)), sparkline(series(r.region, (x) => x.metrics?.delivered_per_s))),
        el("dt", {}, "p99 delivery"),
        el("dd", {}, el("span", { class: "v" }, num(m.p99_delivery_ms, " ms")), sparkline(series(r.region, (x) => x.metrics?.p99_delivery_ms))),
      ),
      lagItems.length ? el("ul", { class: "lags" }, ...lagItems) : null,
      r.errors.length ? el("p", { class: "error" }, r.errors.join("; ")) : null,
      (r.mirror_problems ?? []).length ? el("p", { class: "warn" }, (r.mirror_problems ?? []).join("; ")) : null,
      el("div", { class: "buttons" }, ...buttons),
    );
  });
  $("regions").replaceChildren(...cards);
}

function renderStreams(last: Sample) {
  const rows: HTMLElement[] = [];
  for (const r of last.regions) {
    // An unreachable region keeps its last known rows, marked stale.
    let streams = r.streams;
    let staleSince: number | null = null;
    if (!streams) {
      for (let i = samples.length - 1; i >= 0 && !streams; i--) {
        const older = samples[i].regions.find((x) => x.region === r.region);
        if (older?.streams) {
          streams = older.streams;
          staleSince = samples[i].at_ms;
        }
      }
    }
    for (const [name, h] of Object.entries(streams ?? {})) {
      const pick = (f: (h: StreamHealth) => number | null) =>
        series(r.region, (x) => {
          const s = x.streams?.[name];
          return s ? f(s) : null;
        });
      rows.push(
        el(
          "tr",
          { "data-stream": name, "data-region": r.region },
          el("td", {}, r.region),
          el("td", { class: "mono" }, name),
          el("td", {}, h.mirror ? `${h.origin} (mirror)` : `${h.origin} (own)`),
          el("td", {}, num(h.apply_lag), " ", sparkline(pick((s) => s.apply_lag))),
          el("td", {}, h.mirror ? num(h.mirror_lag) : "–", " ", h.mirror ? sparkline(pick((s) => s.mirror_lag)) : null),
          el(
            "td",
            {},
            h.active_age_ms === null ? "–" : num(h.active_age_ms, " ms"),
            " ",
            h.mirror ? sparkline(pick((s) => s.active_age_ms)) : null,
          ),
          staleSince !== null
            ? el("td", { class: "warn" }, `no answer since ${time(staleSince)}`)
            : el("td", { class: h.error ? "error" : "" }, h.error ?? "ok"),
        ),
      );
    }
  }
  $("streams").querySelector("tbody")!.replaceChildren(...rows);
}

function renderActions(actions: Action[]) {
  const rows = actions.map((a) =>
    el(
      "tr",
      { class: a.status < 300 ? "" : "refused" },
      el("td", {}, time(a.at_ms)),
      el("td", {}, a.operator),
      el("td", {}, a.action === "failover" ? `failover ${a.region} → ${a.to}` : `failback ${a.region}`),
      el("td", {}, a.outcome),
    ),
  );
  $("actions").querySelector("tbody")!.replaceChildren(...rows);
}

// ---------------------------------------------------------------------------------------
// Actions: a confirmation naming what happens, then the admin call; the answer (or the
// refusal and its reasons) is shown.

function ask(title: string, body: Node[], ok: string): Promise<boolean> {
  const d = $<HTMLDialogElement>("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").replaceChildren(...body);
  $("confirm-ok").textContent = ok;
  d.returnValue = "";
  d.showModal();
  return new Promise((resolve) => d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true }));
}

function confirmFailover(region: string, to: string, epoch: string) {
  void ask(
    `Fail over ${region} to ${to}?`,
    [
      el("p", {}, `Users of region ${region} will be served by region ${to} from now on.`),
      el("ul", {},
        el("li", {}, `${region} refuses their requests with 421, naming ${to}; their clients reconnect there.`),
        el("li", {}, `Their inbox epochs change (now ${epoch.slice(0, 12)}…): every client resyncs its inbox.`),
        el("li", {}, `Failing back later needs ${region} to have applied everything ${to} accepted meanwhile.`),
      ),
    ],
    `Fail over ${region} → ${to}`,
  ).then((ok) => {
    if (ok) void act("/v1/admin/console/failover", { region, to }, `failover ${region} → ${to}`);
  });
}

function confirmFailback(region: string, serving: string) {
  void ask(
    `Fail back ${region}?`,
    [
      el("p", {}, `Users of region ${region} will be served by ${region} again instead of ${serving}.`),
      el("ul", {},
        el("li", {}, `${serving} refuses their requests with 421, naming ${region}.`),
        el("li", {}, `Their inbox epochs change: every client resyncs its inbox.`),
        el("li", {}, `Refused (409 not_caught_up) until ${region} has applied everything ${serving} accepted for them.`),
      ),
    ],
    `Fail back ${region}`,
  ).then((ok) => {
    if (ok) void act("/v1/admin/console/failback", { region }, `failback ${region}`);
  });
}

async function act(path: string, body: object, what: string) {
  const out = $("action-result");
  out.hidden = false;
  out.className = "result pending";
  delete out.dataset.outcome;
  out.textContent = `${what}: sent…`;
  busy = true;
  try {
    const resp = await fetch(path, {
      method: "POST",
      headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await resp.json().catch(() => ({}));
    if (resp.ok) {
      out.className = "result ok";
      out.dataset.outcome = "ok";
      out.textContent = `${what}: done. ${answer.serving} serves ${answer.region}'s users, epoch ${String(answer.epoch).slice(0, 12)}…${answer.changed === false ? " (it was so already)" : ""}`;
    } else {
      out.className = "result refused";
      out.dataset.outcome = "refused";
      const reasons: string[] = [
        ...Object.entries((answer.lag ?? {}) as Record<string, number>).map(([s, n]) => `${s}: ${n} events behind`),
        ...((answer.reasons ?? []) as string[]),
      ];
      out.replaceChildren(
        el("strong", {}, `${what}: refused ${resp.status} ${answer.error ?? ""}`),
        el("p", {}, answer.message ?? ""),
        reasons.length ? el("ul", {}, ...reasons.map((r) => el("li", {}, r))) : "",
      );
    }
  } catch (e) {
    out.className = "result refused";
    out.dataset.outcome = "error";
    out.textContent = `${what}: ${(e as Error).message}`;
  } finally {
    busy = false;
    render();
  }
}

// ---------------------------------------------------------------------------------------
// Drill reports.

interface DrillRun {
  run: string;
  verdict: string | null;
  acked?: number | null;
  lost?: number | null;
  duplicated?: number | null;
  delivered?: number | null;
  converge_s?: number | null;
  faults?: number;
  violations?: number;
}

async function loadDrills() {
  const resp = await fetch("/v1/admin/drills", { headers: headers() });
  if (!resp.ok) {
    $("drills-note").textContent = `drill list: ${resp.status}`;
    return;
  }
  const answer = (await resp.json()) as { configured: boolean; runs: DrillRun[] };
  $("drills-note").textContent = answer.configured
    ? `${answer.runs.length} run(s)`
    : "No drills directory configured (console.drills_dir).";
  const rows = answer.runs.map((r) => {
    const tr = el(
      "tr",
      { class: `drill ${r.verdict ?? ""}`, "data-run": r.run },
      el("td", {}, el("a", { href: "#", class: "mono" }, r.run)),
      el("td", {}, el("span", { class: `badge ${r.verdict === "pass" ? "converged" : "diverged"}` }, r.verdict ?? "?")),
      el("td", {}, num(r.acked)),
      el("td", {}, num(r.lost)),
      el("td", {}, num(r.duplicated)),
      el("td", {}, num(r.delivered)),
      el("td", {}, num(r.converge_s, " s")),
      el("td", {}, String(r.faults ?? "–")),
      el("td", {}, String(r.violations ?? "–")),
    );
    tr.querySelector("a")!.addEventListener("click", (ev) => {
      ev.preventDefault();
      void showDrill(r.run);
    });
    return tr;
  });
  $("drills").querySelector("tbody")!.replaceChildren(...rows);
}

let pictureUrl: string | null = null;

async function showDrill(run: string) {
  const detail = $("drill-detail");
  detail.hidden = false;
  detail.textContent = `loading ${run}…`;
  const enc = encodeURIComponent(run);
  const [report, picture] = await Promise.all([
    fetch(`/v1/admin/drills/${enc}/report`, { headers: headers() }),
    fetch(`/v1/admin/drills/${enc}/picture`, { headers: headers() }),
  ]);
  const r = report.ok ? await report.json() : null;
  if (pictureUrl) URL.revokeObjectURL(pictureUrl);
  pictureUrl = picture.ok ? URL.createObjectURL(await picture.blob()) : null;
  const faults = ((r?.faults ?? []) as { kind: string; target: string; detail: string; recovery_s: number | null }[]).map(
    (f) => el("li", {}, `${f.kind} ${f.target}: ${f.detail}; recovered in ${num(f.recovery_s, " s")}`),
  );
  const violations = ((r?.violations ?? []) as { invariant: string; expected: string; found: string }[])
    .slice(0, 20)
    .map((v) => el("li", {}, `${v.invariant}: expected ${v.expected}, found ${v.found}`));
  detail.replaceChildren(
    el("h3", {}, `${run}: ${r?.verdict ?? "no report"}`),
    r
      ? el(
          "p",
          {},
          `${r.scenario} on ${(r.regions ?? []).join(", ")}, ${num(r.duration_s, " s")}: acked ${r.acked}, lost ${r.lost}, duplicated ${r.duplicated}, delivered ${r.delivered}; converged in ${num(r.converge_s, " s")}; digests ${r.digests_equal ? "equal" : "differ"}.`,
        )
      : el("p", { class: "error" }, `report: ${report.status}`),
    faults.length ? el("ul", {}, ...faults) : "",
    violations.length ? el("ul", { class: "error" }, ...violations) : "",
    pictureUrl ? el("img", { src: pictureUrl, alt: `report picture of ${run}`, class: "picture" }) : el("p", { class: "muted" }, "no picture"),
  );
}

$("drills-refresh").addEventListener("click", () => void loadDrills());

// Relative times in the badge move even between samples.
setInterval(() => samples.length && render(), 5000);

if (adminKey() && operator()) signedIn();
else showLogin();
