// The oddsgate partner dashboard: one module, no dependencies, no build step.
//
// A partner's live statistics (PROTOCOL.md §12) over the same WebSocket and the same
// client as the player shell: it imports app.js's OddsClient and RuleChecker, so the
// snapshot, the resume with {epoch, seq} after a reconnect, coalescing and reset are
// handled by the code the shell's tests hold to §3/§5, not by a copy of it.
// (gateway/static.py rewrites the import to app.js's hashed name.)
//
// 1. Pure helpers: the token's partner claim, row keys, the conversion rate.
// 2. MinuteSeries: clicks per minute over the last hour, from the `minutes:1h` row.
// 3. Dashboard: the DOM, rendered once per animation frame from the client's state.
// 4. Start-up: ?token= (or a readable og_session cookie), window.oddsgate for tests.

import { OddsClient, regionUrls } from "/static/app.js";

// -- 1. helpers ---------------------------------------------------------------------

export const WINDOWS = ["today", "1h", "5m"];
export const DIMENSIONS = ["campaign", "creative"];
const PARTNER_ID = /^[A-Za-z0-9_-]{1,32}$/;
const COUNTERS = ["clicks", "unique_clicks", "bot_clicks", "duplicate_clicks", "registrations",
  "ftds"];

// The `partner` claim of a session token, read without verifying it: the server verifies
// the token and refuses another partner's topic (§12); the page only needs to know which
// topic to ask for. null when the token is not a JWT or carries no valid partner id.
export function partnerOf(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const text = new TextDecoder().decode(
      Uint8Array.from(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0)));
    const partner = JSON.parse(text).partner;
    return typeof partner === "string" && PARTNER_ID.test(partner) ? partner : null;
  } catch {
    return null;
  }
}

// `campaign:{name}:{window}` -> {dimension, name, window}; null for any other key. A name
// may itself hold colons (campaign labels allow them): the window is the last part.
export function parseKey(key) {
  if (typeof key !== "string") return null;
  const first = key.indexOf(":");
  const last = key.lastIndexOf(":");
  if (first < 0 || last <= first) return null;
  const dimension = key.slice(0, first);
  const window = key.slice(last + 1);
  const name = key.slice(first + 1, last);
  if (!DIMENSIONS.includes(dimension) || !WINDOWS.includes(window) || !name) return null;
  return { dimension, name, window };
}

// Registrations per unique click, as a percentage with one decimal; "–" without clicks.
export function conversionRate(counters) {
  const unique = Number(counters?.unique_clicks);
  const regs = Number(counters?.registrations);
  if (!Number.isFinite(unique) || unique <= 0 || !Number.isFinite(regs)) return "–";
  return `${((100 * regs) / unique).toFixed(1)}%`;
}

function count(value) {
  return Number.isInteger(value) ? value.toLocaleString("en-US") : "–";
}

// Deposits are a decimal string (never a float, §12): shown as given, with the currency.
function money(counters) {
  const amount = typeof counters?.deposits === "string" ? counters.deposits : "–";
  const currency = typeof counters?.currency === "string" ? ` ${counters.currency}` : "";
  return amount + (amount === "–" ? "" : currency);
}

// -- 2. clicks per minute -------------------------------------------------------------

export const SERIES_KEY = "minutes:1h";
export const MINUTES = 60;
const MINUTE_MS = 60000;

// The `minutes` object of a series event when it has the documented shape: an integer
// `start` and a list of integers for `clicks`; other lists are optional.
function seriesOf(event) {
  const m = event?.minutes;
  if (m === null || typeof m !== "object" || !Number.isInteger(m.start)) return null;
  return Array.isArray(m.clicks) && m.clicks.every(Number.isInteger) ? m : null;
}

// Clicks per minute over the last hour, from the partner's `minutes:1h` row (README,
// "Per-minute series"). Its event carries the whole hour, bucket i counting minute
// `start + i` (Unix seconds / 60, the last bucket still filling), so the chart is whole
// from the first snapshot on, and each newer event of the row replaces it (a coalesced
// or replayed one included). Minutes after the row's last bucket had no count (the
// server republishes the row every minute while its hour holds a count). The chart ends
// at the later of this clock's minute and the row's last one: a clock behind the
// server's never hides the newest bucket, one ahead shows its minutes as 0.
export class MinuteSeries {
  constructor(now = Date.now) {
    this.now = now;
    this.row = null; // the `minutes` object of the row held, or null
    this.seen = false; // a snapshot came: what it lacks is a real 0
  }

  // The row's newest event the client holds, or undefined when the topic has none
  // (a partner with no count in the last hour, or none yet).
  update(event) {
    this.seen = true;
    this.row = seriesOf(event);
  }

  // The last hour, oldest first: MINUTES entries {minute, clicks, unique, bots,
  // duplicates, known}; `known` is false until a snapshot came.
  series() {
    const nowMinute = Math.floor(this.now() / MINUTE_MS);
    const row = this.row;
    const last = row ? Math.max(nowMinute, row.start + row.clicks.length - 1) : nowMinute;
    const at = (name, i) => {
      const values = row?.[name];
      return Array.isArray(values) && Number.isInteger(values[i]) ? values[i] : 0;
    };
    const out = [];
    for (let m = last - MINUTES + 1; m <= last; m += 1) {
      const i = row ? m - row.start : -1;
      out.push({ minute: m, clicks: at("clicks", i), unique: at("unique_clicks", i),
        bots: at("bot_clicks", i), duplicates: at("duplicate_clicks", i), known: this.seen });
    }
    return out;
  }
}

// -- 3. the dashboard ------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function cells(counters) {
  return [...COUNTERS.map((name) => count(counters?.[name])), money(counters),
    conversionRate(counters)];
}

const FIELDS = [...COUNTERS, "deposits", "conversion_rate"];

// One table (campaigns or creatives) of the chosen window; rows keyed by stats key.
class RowsTable {
  constructor(section, dimension) {
    this.dimension = dimension;
    this.body = section.querySelector("tbody");
    this.meta = section.querySelector(".meta");
    this.empty = section.querySelector(".empty");
    this.rows = new Map(); // key -> {node, seq}
  }

  // Show exactly the rows of `window` held in `markets`; flash those that changed.
  show(markets, window, { flash }) {
    const keys = [];
    for (const key of markets.keys()) {
      const parsed = parseKey(key);
      if (parsed && parsed.dimension === this.dimension && parsed.window === window) {
        keys.push([parsed.name, key]);
      }
    }
    keys.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    const wanted = new Set(keys.map(([, key]) => key));
    for (const [key, row] of this.rows) {
      if (!wanted.has(key)) {
        row.node.remove();
        this.rows.delete(key);
      }
    }
    let previous = null;
    for (const [name, key] of keys) {
      const event = markets.get(key);
      let row = this.rows.get(key);
      if (row === undefined) {
        const node = el("tr");
        node.dataset.key = key;
        node.append(el("td", "", name));
        for (const field of FIELDS) {
          const td = el("td");
          td.dataset.field = field;
          node.append(td);
        }
        row = { node, seq: null, epoch: null };
        this.rows.set(key, row);
      }
      const expected = previous ? previous.nextSibling : this.body.firstChild;
      if (expected !== row.node) this.body.insertBefore(row.node, expected);
      previous = row.node;
      if (row.seq === event.seq && row.epoch === event.epoch) continue;
      const changed = row.seq !== null;
      row.seq = event.seq;
      row.epoch = event.epoch;
      row.node.dataset.seq = String(event.seq);
      const texts = cells(event.counters);
      [...row.node.children].slice(1).forEach((td, i) => {
        td.textContent = texts[i];
      });
      if (flash && changed) {
        row.node.classList.remove("flash");
        void row.node.offsetWidth; // restart the animation
        row.node.classList.add("flash");
      }
    }
    this.empty.textContent = keys.length ? "" : `no ${this.dimension}s in this window yet`;
  }

  setMeta(text) {
    this.meta.textContent = text;
  }
}

export class Dashboard {
  constructor(client, topic, clicks) {
    this.client = client;
    this.topic = topic;
    this.clicks = clicks;
    this.window = "today";
    this.frame = null;
    this.flash = false;
    this.snapshotSeen = false;
    this.root = document.getElementById("dash");
    this.connNode = document.getElementById("conn");
    this.connText = this.connNode.querySelector("span");
    this.notice = document.getElementById("notice");
    this.spark = document.getElementById("spark");
    this.sparkLabel = document.getElementById("spark-label");
    this.tables = DIMENSIONS.map((d) => new RowsTable(document.getElementById(`${d}s`), d));
    this.buttons = [...document.querySelectorAll("button[data-window]")];
    for (const button of this.buttons) {
      button.addEventListener("click", () => this.choose(button.dataset.window));
    }
    this.ticker = setInterval(() => this.drawSpark(), 10000); // bars move as minutes pass
    this.drawSpark();
  }

  choose(window) {
    if (!WINDOWS.includes(window)) return;
    this.window = window;
    for (const button of this.buttons) {
      button.setAttribute("aria-pressed", String(button.dataset.window === window));
    }
    for (const table of this.tables) {
      table.rows.clear();
      table.body.replaceChildren();
    }
    this.render(false);
  }

  onChange(kind, detail) {
    if (kind === "event") {
      this.schedule(true);
    } else if (kind === "snapshot") {
      this.snapshotSeen = true;
      this.schedule(false);
    } else if (kind === "status") {
      this.showStatus();
    } else if (kind === "refused") {
      if (detail.includes(this.topic)) this.refused(this.client.refused[this.topic]);
    }
  }

  refused(code) {
    const partner = this.topic.slice("stats:".length);
    const why = {
      forbidden: `This session may not see partner ${partner}'s statistics (forbidden): `
        + "ask for a dashboard link made for this partner.",
      unknown_topic: "This server does not serve partner statistics (unknown_topic).",
    }[code] || `The server refused partner ${partner}'s statistics (${code}).`;
    this.showNotice(why);
    this.connNode.dataset.state = "refused";
    this.connText.textContent = `refused · ${code}`;
    for (const table of this.tables) table.setMeta("");
  }

  showNotice(text) {
    this.notice.textContent = text;
    this.notice.hidden = false;
    this.root.setAttribute("aria-busy", "false");
  }

  schedule(flash) {
    this.flash = this.flash || flash;
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => this.render(this.flash));
  }

  render(flash) {
    this.frame = null;
    this.flash = false;
    const state = this.client.checker.topics.get(this.topic);
    if (state === undefined || !state.hasBase) return;
    for (const table of this.tables) {
      table.show(state.markets, this.window, { flash });
      table.setMeta(`seq ${state.seq}`);
    }
    this.root.dataset.seq = String(state.seq);
    this.root.dataset.epoch = String(state.epoch);
    this.root.setAttribute("aria-busy", "false");
    // The chart follows the series row held, whatever brought it: snapshot, live
    // event, replay after a resume, or the snapshot after a reset.
    this.clicks.update(state.markets.get(SERIES_KEY));
    this.drawSpark();
  }

  drawSpark() {
    const series = this.clicks.series();
    const peak = Math.max(1, ...series.map((s) => s.clicks));
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${MINUTES * 4} 40`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    series.forEach((s, i) => {
      const height = s.clicks ? Math.max(1, (38 * s.clicks) / peak) : 0.5;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", String(i * 4));
      rect.setAttribute("y", String(40 - height));
      rect.setAttribute("width", "3");
      rect.setAttribute("height", String(height));
      rect.dataset.minute = String(s.minute);
      rect.dataset.clicks = String(s.clicks);
      rect.dataset.known = String(s.known);
      const title = document.createElementNS(SVG, "title");
      const at = new Date(s.minute * MINUTE_MS).toISOString().slice(11, 16);
      title.textContent = s.known
        ? `${at} UTC: ${s.clicks} clicks (${s.unique} unique, ${s.bots} bots, `
          + `${s.duplicates} duplicates)`
        : `${at} UTC: waiting for statistics`;
      rect.append(title);
      svg.append(rect);
    });
    const total = series.reduce((sum, s) => sum + s.clicks, 0);
    const known = series[0].known;
    svg.setAttribute("aria-label", known ? `${total} clicks in the last hour`
      : "waiting for statistics");
    this.spark.replaceChildren(svg);
    const label = known ? `${total.toLocaleString("en-US")} clicks · peak `
      + `${Math.max(...series.map((s) => s.clicks))}/min` : "waiting…";
    if (this.sparkLabel.textContent !== label) this.sparkLabel.textContent = label;
  }

  showStatus() {
    const c = this.client;
    if (c.refused[this.topic] !== undefined) return; // the refusal stays on screen
    this.connNode.dataset.state = c.status;
    const text = {
      connecting: "connecting…",
      connected: "connected",
      resuming: "resuming…",
      resumed: `resumed (${c.stats.resumes})`,
      reset: `reset · ${c.detail}`,
      closed: `closed · ${c.detail}`,
      reconnecting: "reconnecting…",
    }[c.status] || c.status;
    this.connText.textContent = text;
    this.connNode.title = c.detail;
    if (c.status === "closed" && c.closeInfo && c.closeInfo.code === 4401) {
      this.showNotice(`The server refused this session token (${c.detail}): `
        + "ask for a new dashboard link.");
    }
  }
}

// -- 4. start-up --------------------------------------------------------------------------

function cookieToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === "og_session" && rest.length) return rest.join("=");
  }
  return null;
}

function expose(client, dashboard, topic, partner) {
  const api = {
    partner,
    topic,
    get status() { return client.status; },
    get statusLog() { return client.statusLog.map((s) => ({ ...s })); },
    get violations() { return client.checker.total; },
    get violationList() { return client.checker.violations.map((v) => ({ ...v })); },
    get refused() { return { ...client.refused }; },
    get resumes() { return client.stats.resumes; },
    get resets() { return client.stats.resets; },
    get stats() { return { ...client.stats }; },
    get window() { return dashboard.window; },
    get rows() {
      const st = client.checker.topics.get(topic);
      const out = {};
      if (st) for (const [key, ev] of st.markets) out[key] = { seq: ev.seq, counters: ev.counters };
      return out;
    },
    get held() {
      const st = client.checker.topics.get(topic);
      return st ? { epoch: st.epoch, seq: st.seq, hasBase: st.hasBase } : null;
    },
    get minutes() { return dashboard.clicks.series(); },
  };
  Object.defineProperty(api, "lib", { value: { partnerOf, parseKey, conversionRate, MinuteSeries } });
  Object.defineProperty(api, "client", { value: client });
  window.oddsgate = api;
}

function main() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || cookieToken();
  const partner = partnerOf(token);
  if (partner === null) {
    const conn = document.getElementById("conn");
    conn.dataset.state = "closed";
    conn.querySelector("span").textContent = "no partner session";
    const notice = document.getElementById("notice");
    notice.textContent = token
      ? "This session token carries no partner: open the dashboard link made for your partner id."
      : "This page needs a partner session token: open it with ?token=… as given to you.";
    notice.hidden = false;
    document.getElementById("dash").setAttribute("aria-busy", "false");
    window.oddsgate = { partner: null, status: "closed" };
    return;
  }
  const topic = `stats:${partner}`;
  document.getElementById("partner").textContent = partner;
  document.title = `Partner ${partner} · oddsgate`;
  let dashboard = null;
  // The token goes in the URL only when it came from the URL: a cookie goes by itself.
  const client = new OddsClient(regionUrls(params.get("regions"), params.get("token")), [topic],
    { onChange: (kind, detail) => dashboard?.onChange(kind, detail) });
  dashboard = new Dashboard(client, topic, new MinuteSeries());
  expose(client, dashboard, topic, partner);
  client.start();
  addEventListener("online", () => client.retryNow());
}

if (typeof document !== "undefined" && document.getElementById("dash")) main();
