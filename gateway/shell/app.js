// The oddsgate player shell: one module, no dependencies, no build step.
//
// 1. RuleChecker: PROTOCOL.md §5 as a client sees it, a mirror of client/rules.py
//    (same rules, same names, same held state); it is also what the page shows.
// 2. OddsClient: one player connection that survives reconnects, a mirror of
//    client/odds.py: last seq per topic, resume with {epoch, seq}, honour
//    reconnect.after_ms, full-jitter exponential backoff otherwise; given several
//    region URLs, fails over between them as client.odds.RegionRing decides (§8).
// 3. Board: the DOM. Events mark markets dirty; one animation frame renders them,
//    so a burst costs one DOM write per market, never one per event.
//    The partner dashboard (partner.js, /partner/) imports 1 and 2 from this module:
//    `stats` events (PROTOCOL.md §12) follow the same rules, `key` in `market`'s role.
// 4. Start-up: URL parameters (token, topics, regions), window.oddsgate for tests and
//    benches.
//    index.html's inline bootstrap has already opened the WebSocket (and asked for
//    /v1/topics when no topics are given) while this module was loading; OddsClient
//    adopts that socket as its first connection.

// -- 1. rules ------------------------------------------------------------------

export const SEQ_ORDER = "seq_order";
export const MARKET_REGRESSION = "market_regression";
export const SILENT_GAP = "silent_gap";
export const UNEXPECTED = "unexpected";
export const EPOCH = "epoch";
export const BAD_SNAPSHOT = "bad_snapshot";
export const MALFORMED = "malformed";

const isInt = Number.isInteger;
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const has = (obj, key) => isObject(obj) && Object.prototype.hasOwnProperty.call(obj, key);

// The event types carrying one row's whole state: odds (§1, a market) and stats (§12, a
// partner's counters row). Both obey §5 with rowKey() as the unit that supersedes.
export const EVENT_TYPES = new Set(["odds", "stats"]);

// What a newer event of the same row supersedes: an odds event's market, a stats event's key.
export function rowKey(event) {
  return isObject(event) ? (event.type === "stats" ? event.key : event.market) : undefined;
}

// Topics named by subscribed/unsubscribed/error: a list, one string, or an object's keys.
function topicNames(topics) {
  if (topics === null || topics === undefined) return [];
  if (typeof topics === "string") return [topics];
  if (Array.isArray(topics)) return topics;
  return isObject(topics) ? Object.keys(topics) : [];
}

// What the client holds for one topic (client.rules.TopicState).
export class TopicState {
  constructor() {
    this.epoch = null;
    this.seq = null;
    this.markets = new Map(); // market -> newest event held
    this.hasBase = false; // a snapshot or an adopted resume point
    this.live = false; // subscribed on the current connection
    this.afterReset = false;
  }

  get synced() {
    return this.live && this.hasBase;
  }

  resumePoint() {
    return this.hasBase ? { epoch: this.epoch, seq: this.seq } : null;
  }
}

// Checks §5 on one client's received messages, across its reconnects, and holds
// what the client shows. feedEvent() returns true when the event became its
// market's state: only then may the screen change.
export class RuleChecker {
  constructor({ maxRecorded = 1000 } = {}) {
    this.topics = new Map();
    this.violations = [];
    this.counts = {};
    this.total = 0;
    this.maxRecorded = maxRecorded;
    this.announced = new Map(); // topic -> [epoch, seq] | null, until its `subscribed`
  }

  get ok() {
    return this.total === 0;
  }

  state(topic) {
    let st = this.topics.get(topic);
    if (st === undefined) {
      st = new TopicState();
      this.topics.set(topic, st);
    }
    return st;
  }

  synced(topic) {
    const st = this.topics.get(topic);
    return st !== undefined && st.live && st.hasBase;
  }

  expectResume(topic, epoch, seq) {
    this.announced.set(topic, [epoch, seq]);
  }

  expectSnapshot(topic) {
    this.announced.set(topic, null);
  }

  feed(msg) {
    const kind = isObject(msg) ? msg.type : undefined;
    if (EVENT_TYPES.has(kind)) this.feedEvent(msg);
    else if (kind === "batch") for (const ev of msg.events || []) this.feedEvent(ev);
    else if (kind === "snapshot") this.onSnapshot(msg);
    else if (kind === "reset") this.onReset(msg);
    else if (kind === "subscribed") this.onSubscribed(msg);
    else if (kind === "unsubscribed") this.onUnsubscribed(msg);
    else if (kind === "welcome") this.onWelcome();
    else if (kind === "error") for (const t of topicNames(msg.topics)) this.announced.delete(t);
  }

  feedEvent(event) {
    const market = rowKey(event);
    if (!["topic", "seq", "epoch"].every((k) => has(event, k)) || market === undefined) {
      this.violate(MALFORMED, String(isObject(event) ? event.topic : undefined),
        "event lacks a field");
      return false;
    }
    const { topic, seq, epoch } = event;
    if (!isInt(seq)) {
      this.violate(MALFORMED, String(topic), `odds seq is not an integer: ${seq}`);
      return false;
    }
    const st = this.topics.get(topic);
    if (st === undefined || !st.live || !st.hasBase) {
      const why = st === undefined || !st.live ? "topic not subscribed on this connection"
        : "no snapshot or resume base yet";
      this.violate(UNEXPECTED, topic, `odds seq ${seq}: ${why}`);
      return false;
    }
    if (epoch !== st.epoch) {
      this.violate(EPOCH, topic, `odds seq ${seq} of epoch ${epoch} while holding ${st.epoch}`);
      return false;
    }
    const last = st.seq;
    const held = st.markets.get(market);
    const heldSeq = held !== undefined ? held.seq : -1;
    if (seq <= last) {
      const what = seq === last ? "repeated" : `went down from ${last}`;
      this.violate(SEQ_ORDER, topic, `seq ${seq} ${what}`);
      if (seq < heldSeq) {
        this.violate(MARKET_REGRESSION, topic, `market ${market}: seq ${seq} < ${heldSeq}`);
      }
      return false;
    }
    if (seq !== last + 1 && !event.coalesced) {
      this.violate(SILENT_GAP, topic, `seq ${last} -> ${seq} without coalesced flag`);
    }
    st.seq = seq;
    if (seq < heldSeq) {
      this.violate(MARKET_REGRESSION, topic, `market ${market}: seq ${seq} older than ${heldSeq}`);
      return false;
    }
    st.markets.set(market, event);
    return true;
  }

  onWelcome() {
    // A new connection: nothing is subscribed on it yet; held state stays.
    for (const st of this.topics.values()) st.live = false;
  }

  onSubscribed(msg) {
    for (const topic of topicNames(msg.topics)) {
      const st = this.state(topic);
      if (this.announced.has(topic)) {
        this.adopt(st, this.announced.get(topic));
        this.announced.delete(topic);
      }
      st.live = true;
    }
  }

  adopt(st, announced) {
    if (announced === null) {
      Object.assign(st, { epoch: null, seq: null, markets: new Map(), hasBase: false,
        afterReset: false });
      return;
    }
    const [epoch, seq] = announced;
    if (st.hasBase && st.epoch === epoch && st.seq === seq) return;
    if (st.hasBase && st.epoch === epoch) {
      st.markets = new Map([...st.markets].filter(([, ev]) => ev.seq <= seq));
    } else {
      st.markets = new Map();
    }
    Object.assign(st, { epoch, seq, hasBase: true, afterReset: false });
  }

  onUnsubscribed(msg) {
    for (const topic of topicNames(msg.topics)) {
      this.topics.delete(topic);
      this.announced.delete(topic);
    }
  }

  onReset(msg) {
    const topic = msg.topic;
    if (typeof topic !== "string") {
      this.violate(MALFORMED, String(topic), "reset lacks a topic");
      return;
    }
    const st = this.state(topic);
    if (!st.live) this.violate(UNEXPECTED, topic, "reset for a topic not subscribed here");
    st.hasBase = false;
    st.afterReset = true;
    st.markets = new Map();
  }

  onSnapshot(msg) {
    if (!["topic", "epoch", "seq", "markets"].every((k) => has(msg, k))) {
      this.violate(MALFORMED, String(msg.topic), "snapshot lacks a field");
      return;
    }
    const { topic, epoch, markets } = msg;
    let seq = msg.seq;
    if (typeof topic !== "string" || !isInt(seq)) {
      this.violate(MALFORMED, String(topic), `snapshot topic/seq malformed: ${seq}`);
      return;
    }
    const st = this.state(topic);
    if (!st.live) {
      this.violate(UNEXPECTED, topic, `snapshot seq ${seq} for a topic not subscribed here`);
    }
    const fresh = new Map();
    for (const event of markets) {
      const market = rowKey(event);
      const evSeq = isObject(event) ? event.seq : undefined;
      if (typeof market !== "string" || !(isInt(evSeq) || typeof evSeq === "boolean")) {
        this.violate(MALFORMED, topic, "snapshot market lacks a field");
        continue;
      }
      const evEpoch = has(event, "epoch") ? event.epoch : epoch;
      if (evSeq > seq || evEpoch !== epoch) {
        this.violate(BAD_SNAPSHOT, topic, `market ${market} seq ${evSeq} in snapshot seq ${seq}`);
      }
      fresh.set(market, event);
    }
    const continues = st.hasBase && !st.afterReset;
    if (continues && epoch !== st.epoch) {
      this.violate(EPOCH, topic, `snapshot of epoch ${epoch} while holding ${st.epoch}, no reset`);
    } else if (continues) {
      if (seq < st.seq) {
        this.violate(SEQ_ORDER, topic, `snapshot seq ${seq} below held seq ${st.seq}`);
        seq = st.seq;
      }
      for (const [market, held] of st.markets) {
        const next = fresh.get(market);
        if (next !== undefined && next.seq < held.seq) {
          this.violate(MARKET_REGRESSION, topic, `market ${market}: snapshot older than held`);
          fresh.set(market, held);
        }
      }
    }
    Object.assign(st, { epoch, seq, markets: fresh, hasBase: true, afterReset: false });
  }

  violate(rule, topic, detail) {
    this.counts[rule] = (this.counts[rule] || 0) + 1;
    this.total += 1;
    if (this.violations.length < this.maxRecorded) this.violations.push({ rule, topic, detail });
  }
}

// -- 2. the connection ------------------------------------------------------------

export const BACKOFF_BASE_MS = 100;
export const BACKOFF_CAP_MS = 5000;
// Closes after which retrying cannot help (§4): policy, too big, bad requests,
// unauthorized, rate limited.
export const TERMINAL_CLOSE_CODES = new Set([1008, 1009, 4400, 4401, 4429]);
const OPEN_TIMEOUT_MS = 10000;
// The `reconnect` reason that drains a whole region (§8): go to another one. Other
// reasons (drain, restart, overload) concern one worker: the same URL is right.
export const REGION_DRAIN = "region_drain";

export function movesRegion(reason) {
  return reason === REGION_DRAIN;
}

// Where the next connection attempt goes, and whether to back off first: a mirror of
// client.odds.RegionRing. A failed attempt moves to the next region at once; only a
// whole pass of failures (every region in a row) backs off, and the next pass starts
// where the last ended. A drop of a working connection tries the same region first;
// a region_drain leaves it without counting a failure. With one URL every failure
// backs off, as before regions.
export class RegionRing {
  constructor(urls) {
    if (!Array.isArray(urls) || !urls.length) throw new TypeError("RegionRing needs URLs");
    this.urls = [...urls];
    this.index = 0; // the region the next attempt goes to
    this.failedInARow = 0; // attempts failed since the last that was welcomed
  }

  get current() {
    return this.urls[this.index];
  }

  connected() {
    this.failedInARow = 0;
  }

  // The attempt at `current` failed: move on. True when that completed a pass of
  // failures over every region: back off before the next attempt.
  failed() {
    this.failedInARow += 1;
    this.index = (this.index + 1) % this.urls.length;
    return this.failedInARow % this.urls.length === 0;
  }

  leave() {
    this.index = (this.index + 1) % this.urls.length;
  }
}

// Milliseconds before reconnect `attempt` (0-based): uniform in [0, min(cap, base * 2^n)],
// so a fleet of players dropped together does not return together.
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 32));
  return random() * ceiling;
}

// One player connection, resumed across disconnects and regions. `urls` is one URL or a
// list of region URLs (§8), tried in order. `onChange(kind, detail)` is
// told of everything the page shows: "status", "snapshot" (topic), "event" (the
// event, only when it became its market's state), "reset" (topic), "refused".
// `early` is index.html's window.__ogEarly ({ws, frames, closed, sent}): a socket opened
// before this module ran, which the first open() adopts instead of opening one, and the
// subscribe request the page sent on it on welcome, if any.
export class OddsClient {
  constructor(urls, topics, { onChange = () => {}, WebSocketImpl = WebSocket,
    now = Date.now, random = Math.random, early = null } = {}) {
    this.ring = new RegionRing(typeof urls === "string" ? [urls] : urls);
    this.regionIndex = null; // the ring's index of the connection last welcomed
    this.region = null; // what the last welcome named (§8), if it did
    this.wanted = [...new Set(topics)]; // topics to follow, in display order
    this.onChange = onChange;
    this.WebSocketImpl = WebSocketImpl;
    this.now = now;
    this.random = random;
    this.checker = new RuleChecker();
    this.status = "idle";
    this.statusLog = []; // [{state, at, detail}], the last 100
    this.detail = "";
    this.stats = { frames: 0, events: 0, batches: 0, snapshots: 0, resets: 0, coalesced: 0,
      errors: 0, connections: 0, reconnects: 0, resumes: 0, failovers: 0,
      connectFailures: 0, backoffs: 0 };
    this.errors = []; // error frames and refusals, the last 50
    this.refused = {}; // topic -> error code, for topics given up
    this.welcome = null;
    this.closeInfo = null;
    this.reconnectAt = null; // epoch ms of the next attempt while reconnecting
    this.ws = null;
    this.attempt = 0;
    this.afterMs = null; // from the last `reconnect` frame
    this.leaveRegion = false; // and whether its reason drains the whole region
    this.hintReason = null; // and its reason: drain, restart, overload, region_drain
    this.openedAt = 0;
    this.lastFrameAt = 0;
    this.pingSentAt = null;
    this.heartbeatMs = 20000;
    this.ids = 0;
    this.pending = new Map(); // request id -> {op, topics, resume}
    this.timers = new Set();
    this.watchdog = null;
    this.stopped = false;
    this.early = early?.ws ? early : null;
    this.earlySent = null; // the early subscribe request, while its frames are replayed
    this.earlySocket = this.early ? "pending" : "none"; // then "adopted", or "closed" before
  }

  get url() {
    return this.ring.current; // the region connected to, or the next attempt's
  }

  // The URL of the region last welcomed (while reconnecting, the one just left).
  get regionUrl() {
    return this.regionIndex === null ? null : this.ring.urls[this.regionIndex];
  }

  setStatus(state, detail = "") {
    this.status = state;
    this.detail = detail;
    this.statusLog.push({ state, detail, at: this.now() });
    if (this.statusLog.length > 100) this.statusLog.shift();
    this.onChange("status", state);
  }

  later(fn, ms) {
    const id = setTimeout(() => {
      this.timers.delete(id);
      fn();
    }, ms);
    this.timers.add(id);
    return id;
  }

  start() {
    this.open();
  }

  stop() {
    this.stopped = true;
    for (const id of this.timers) clearTimeout(id);
    this.timers.clear();
    clearInterval(this.watchdog);
    if (this.ws) this.detach(this.ws, 1000);
    this.setStatus("closed", "closed by the page");
  }

  open() {
    if (this.stopped) return;
    this.reconnectAt = null;
    if (this.stats.connections === 0) this.setStatus("connecting");
    else this.onChange("status", this.status); // "reconnecting…": an attempt in flight
    const early = this.early;
    this.early = null; // the first connection only
    let ws = early?.ws;
    try {
      ws ??= new this.WebSocketImpl(this.url);
    } catch (err) {
      if (this.ring.urls.length === 1) {
        this.setStatus("closed", `bad URL: ${err}`);
        return;
      }
      // One region's URL refused by the browser (malformed, or not allowed by the
      // page's CSP): a failed attempt like any other; the next region is tried.
      this.welcome = null;
      this.disconnected(1006, `bad URL: ${err}`);
      return;
    }
    this.ws = ws;
    this.welcome = null;
    this.openedAt = this.now();
    const guard = this.later(() => {
      if (this.ws === ws && this.welcome === null) this.drop(ws, 1006, "no welcome in time");
    }, OPEN_TIMEOUT_MS);
    const closed = (code, reason) => {
      clearTimeout(guard);
      if (this.ws === ws) this.disconnected(code, reason);
    };
    ws.onmessage = (e) => this.onFrame(ws, e.data);
    ws.onclose = (e) => closed(e.code, e.reason);
    if (early) {
      // Adopted: the frames it got before this module ran, in order, then its close if
      // that came too (the close event fired already: it goes the usual way from here).
      this.earlySocket = early.closed ? "closed" : "adopted";
      this.earlySent = early.sent; // sent on the welcome among these frames, if at all
      for (const data of early.frames.splice(0)) {
        if (this.ws === ws) this.onFrame(ws, data);
      }
      this.earlySent = null;
      if (early.closed) closed(early.closed.code, early.closed.reason);
    }
  }

  // The page's CSP refused a connection to `url` (a region not in OG_SHELL_CONNECT_SRC).
  // Chromium fires no close for such a socket: give it up now, not at the open timeout.
  blocked(url) {
    const ws = this.ws;
    if (ws && this.welcome === null && String(url).startsWith(ws.url.split("?")[0])) {
      this.drop(ws, 1006, "blocked by the page's CSP");
    }
  }

  // Give up on `ws` now (no welcome, no pong): stop listening to it and go on.
  drop(ws, code, reason) {
    this.detach(ws, 1000);
    this.disconnected(code, reason);
  }

  detach(ws, code) {
    ws.onmessage = ws.onclose = null;
    try {
      ws.close(code);
    } catch {
      // already closing
    }
    if (this.ws === ws) this.ws = null;
  }

  disconnected(code, reason) {
    this.ws = null;
    this.pending.clear();
    clearInterval(this.watchdog);
    const welcomed = this.welcome !== null;
    this.welcome = null;
    this.closeInfo = { code, reason };
    if (this.stopped) return;
    if (TERMINAL_CLOSE_CODES.has(code)) {
      this.setStatus("closed", `${code} ${reason || ""}`.trim());
      return;
    }
    let delay = 0;
    if (!welcomed) {
      // This attempt reached no region: the next one at once, a backoff after a pass.
      this.stats.connectFailures += 1;
      if (this.ring.failed()) {
        this.stats.backoffs += 1;
        delay = backoffDelay(this.attempt, this.random);
        this.attempt += 1;
      }
    } else {
      // A working connection dropped: its region first, unless it drains as a whole.
      if (this.now() - this.openedAt > BACKOFF_CAP_MS) this.attempt = 0;
      if (this.leaveRegion) this.ring.leave();
      delay = this.afterMs !== null ? this.afterMs : backoffDelay(this.attempt, this.random);
      this.attempt += 1;
    }
    const why = !welcomed ? "unreachable" : this.hintReason || `${code} ${reason || ""}`.trim();
    this.afterMs = null;
    this.hintReason = null;
    this.leaveRegion = false;
    this.reconnectAt = this.now() + delay;
    this.setStatus("reconnecting", why);
    this.reconnectTimer = this.later(() => this.open(), delay);
  }

  // The network is back (a phone leaving a tunnel): no reason to sit out a backoff.
  retryNow() {
    if (this.status === "reconnecting" && this.reconnectTimer !== undefined) {
      clearTimeout(this.reconnectTimer);
      this.timers.delete(this.reconnectTimer);
      this.open();
    }
  }

  send(obj) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(obj));
  }

  onFrame(ws, raw) {
    this.stats.frames += 1;
    this.lastFrameAt = this.now();
    this.pingSentAt = null;
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      this.noteError({ type: "client_error", code: "undecodable_frame" });
      return;
    }
    if (this.welcome === null) {
      if (!isObject(msg) || msg.type !== "welcome") {
        this.drop(ws, 1002, "first frame was not welcome");
        return;
      }
      this.onWelcome(msg);
      return;
    }
    const kind = isObject(msg) ? msg.type : undefined;
    if (EVENT_TYPES.has(kind)) this.onEvent(msg);
    else if (kind === "batch") {
      this.stats.batches += 1;
      for (const ev of msg.events || []) this.onEvent(ev);
    } else this.onControl(kind, msg);
  }

  onWelcome(msg) {
    this.welcome = msg;
    this.checker.feed(msg);
    this.stats.connections += 1;
    this.ring.connected();
    if (this.regionIndex !== null && this.ring.index !== this.regionIndex) {
      this.stats.failovers += 1;
    }
    this.regionIndex = this.ring.index;
    this.region = typeof msg.region === "string" ? msg.region : null;
    const resuming = this.stats.connections > 1;
    if (resuming) this.stats.reconnects += 1;
    if (isInt(msg.heartbeat_ms) && msg.heartbeat_ms > 0) this.heartbeatMs = msg.heartbeat_ms;
    this.watchdog = setInterval(() => this.checkAlive(), Math.min(1000, this.heartbeatMs / 4));
    this.setStatus(resuming ? "resuming" : "connected");
    const sent = this.earlySent;
    if (sent) {
      // The bootstrap asked for these snapshots on welcome: the request is ours now.
      const topics = Object.keys(sent.topics);
      for (const topic of topics) this.checker.expectSnapshot(topic);
      this.ids = Math.max(this.ids, sent.id);
      this.pending.set(sent.id, { op: "subscribe", topics, resume: false });
      this.subscribe(this.wanted.filter((t) => !topics.includes(t)));
    } else {
      this.subscribe(this.wanted, resuming);
    }
  }

  // Every wanted topic from what is held for it (§3): null asks for a snapshot.
  subscribe(topics, resume = false) {
    const request = {};
    for (const topic of topics) {
      const st = this.checker.topics.get(topic);
      const point = st !== undefined ? st.resumePoint() : null;
      request[topic] = point;
      if (point === null) this.checker.expectSnapshot(topic);
      else this.checker.expectResume(topic, point.epoch, point.seq);
    }
    if (!Object.keys(request).length) return;
    const id = ++this.ids;
    this.pending.set(id, { op: "subscribe", topics: Object.keys(request), resume });
    this.send({ op: "subscribe", id, topics: request });
  }

  // The server pings at the WebSocket level and the browser answers, but a page
  // cannot see a dead link that way: after a silent heartbeat it asks for a pong,
  // and after a second one it gives the connection up.
  checkAlive() {
    const ws = this.ws;
    if (!ws || this.welcome === null) return;
    const quiet = this.now() - this.lastFrameAt;
    if (this.pingSentAt !== null && this.now() - this.pingSentAt > this.heartbeatMs) {
      this.drop(ws, 1006, "no pong");
    } else if (this.pingSentAt === null && quiet > this.heartbeatMs) {
      this.pingSentAt = this.now();
      this.send({ op: "ping", id: ++this.ids });
    }
  }

  onEvent(event) {
    this.stats.events += 1;
    if (isObject(event) && event.coalesced) this.stats.coalesced += 1;
    if (this.checker.feedEvent(event)) this.onChange("event", event);
  }

  onControl(kind, msg) {
    this.checker.feed(msg);
    if (kind === "snapshot") {
      this.stats.snapshots += 1;
      this.onChange("snapshot", msg.topic);
    } else if (kind === "reset") {
      this.stats.resets += 1;
      this.setStatus("reset", `${msg.topic}: ${msg.reason || ""}`);
      this.onChange("reset", msg.topic);
    } else if (kind === "subscribed") {
      const request = this.pending.get(msg.id);
      this.pending.delete(msg.id);
      if (request !== undefined && request.resume) {
        this.stats.resumes += 1;
        this.setStatus("resumed", `${this.stats.resumes}`);
      }
    } else if (kind === "error") {
      this.onError(msg);
    } else if (kind === "reconnect") {
      if (isInt(msg.after_ms) && msg.after_ms >= 0) this.afterMs = msg.after_ms;
      this.hintReason = typeof msg.reason === "string" ? msg.reason : null;
      this.leaveRegion = movesRegion(msg.reason);
    }
  }

  onError(msg) {
    this.stats.errors += 1;
    this.noteError(msg);
    const request = this.pending.get(msg.id);
    if (request === undefined || request.op !== "subscribe") return;
    const topics = topicNames(msg.topics);
    const retryMs = isInt(msg.retry_after_ms) ? msg.retry_after_ms : null;
    if (topics.length && msg.code !== "shed") {
      // Refused for good (unknown_topic, forbidden, too_many_topics): stop wanting it.
      for (const topic of topics) {
        this.refused[topic] = msg.code;
        this.checker.topics.delete(topic);
      }
      this.wanted = this.wanted.filter((t) => !topics.includes(t));
      this.onChange("refused", topics);
      return;
    }
    // Shed topics (§5), or the whole request refused (rate_limited): ask again later
    // on this connection; a reconnect meanwhile asks again anyway.
    const again = topics.length ? topics : request.topics;
    if (!topics.length) this.pending.delete(msg.id);
    const ws = this.ws;
    const delay = retryMs !== null ? retryMs : backoffDelay(this.attempt + 3, this.random);
    this.later(() => {
      if (this.ws === ws && ws !== null) {
        this.subscribe(again.filter((t) => this.wanted.includes(t)));
      }
    }, delay);
  }

  noteError(msg) {
    this.errors.push(msg);
    if (this.errors.length > 50) this.errors.shift();
  }
}

// -- 3. the board -------------------------------------------------------------------

const OUTCOME_ORDER = ["home", "draw", "away"];
const OUTCOME_LABELS = { home: "1", draw: "X", away: "2" };
const FLASH_MS = 900;
const FLASH_UP = "rgba(46, 204, 113, 0.55)";
const FLASH_DOWN = "rgba(255, 95, 86, 0.55)";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function outcomesOf(prices) {
  const names = Object.keys(prices || {});
  const known = OUTCOME_ORDER.filter((o) => names.includes(o));
  return [...known, ...names.filter((o) => !OUTCOME_ORDER.includes(o)).sort()];
}

function byMarketId(a, b) {
  const x = a.split(":").map(Number);
  const y = b.split(":").map(Number);
  for (let i = 0; i < Math.max(x.length, y.length); i += 1) {
    if ((x[i] || 0) !== (y[i] || 0)) return (x[i] || 0) - (y[i] || 0);
  }
  return 0;
}

// One market on screen: it only ever moves forward (epoch, seq), a snapshot aside.
class MarketRow {
  constructor(market) {
    this.market = market;
    this.epoch = null;
    this.seq = -1;
    this.node = el("div", "mkt");
    this.node.dataset.market = market;
    this.title = el("div", "name", `Market ${market.split(":").pop()}`);
    this.sub = el("small");
    this.title.append(this.sub);
    this.badge = el("span", "badge");
    this.prices = el("div", "prices");
    this.cells = new Map(); // outcome -> {node, value}
    this.node.append(this.title, this.prices, this.badge);
  }

  // Returns false, and changes nothing, when `event` is not newer than what is shown.
  show(event, { flash }) {
    if (event.epoch === this.epoch && event.seq <= this.seq) return false;
    this.epoch = event.epoch;
    this.seq = event.seq;
    this.node.dataset.seq = String(event.seq);
    this.node.dataset.status = event.status || "open";
    this.badge.textContent = event.status === "open" ? "" : String(event.status).toUpperCase();
    this.sub.textContent = event.event_id || "";
    const outcomes = outcomesOf(event.prices);
    if (outcomes.join() !== [...this.cells.keys()].join()) {
      this.cells.clear();
      this.prices.replaceChildren();
      for (const outcome of outcomes) {
        const node = el("div", "px");
        node.dataset.outcome = outcome;
        const value = el("span", "v", "–");
        node.append(el("span", "k", OUTCOME_LABELS[outcome] || outcome), value);
        this.prices.append(node);
        this.cells.set(outcome, { node, value });
      }
    }
    for (const [outcome, cell] of this.cells) {
      const price = event.prices[outcome];
      const before = cell.value.textContent;
      if (price === before) continue;
      cell.value.textContent = price;
      if (!flash || before === "–") continue;
      const up = Number(price) > Number(before);
      cell.node.dataset.dir = up ? "up" : "down";
      if (cell.node.animate) {
        cell.node.animate([{ backgroundColor: up ? FLASH_UP : FLASH_DOWN }, {}],
          { duration: FLASH_MS, easing: "ease-out" });
      }
    }
    return true;
  }
}

class TopicView {
  constructor(topic, label) {
    this.topic = topic;
    this.rows = new Map();
    this.node = el("section", "topic");
    this.node.dataset.topic = topic;
    this.heading = el("h2");
    this.title = el("span", "", label);
    this.meta = el("small", "", "waiting for snapshot…");
    this.heading.append(this.title, this.meta);
    this.note = el("div", "note", "");
    this.body = el("div", "markets");
    this.node.append(this.heading, this.body, this.note);
  }

  // A snapshot replaces the view: rows not in it go, the rest show its state.
  replace(state) {
    const markets = [...state.markets.keys()].sort(byMarketId);
    this.rows = new Map();
    this.body.replaceChildren();
    for (const market of markets) {
      const row = new MarketRow(market);
      row.show(state.markets.get(market), { flash: false });
      this.rows.set(market, row);
      this.body.append(row.node);
    }
    this.node.dataset.epoch = state.epoch;
    this.note.textContent = markets.length ? "" : "no markets yet";
    this.setMeta(state);
  }

  apply(event) {
    let row = this.rows.get(event.market);
    if (row === undefined) {
      row = new MarketRow(event.market);
      this.rows.set(event.market, row);
      const after = [...this.rows.keys()].sort(byMarketId)
        .find((m) => byMarketId(m, event.market) > 0);
      this.body.insertBefore(row.node, after ? this.rows.get(after).node : null);
      this.note.textContent = "";
    }
    return row.show(event, { flash: true });
  }

  setMeta(state) {
    this.meta.textContent = `seq ${state.seq}`;
    this.node.dataset.seq = String(state.seq);
  }
}

export class Board {
  constructor(root, client, labels) {
    this.root = root;
    this.client = client;
    this.views = new Map();
    this.dirty = new Map(); // "topic market" -> [topic, market]
    this.frame = null;
    this.latencyMs = null;
    this.latencies = []; // the last 200 publish-to-screen latencies, ms
    this.firstRenderAt = null;
    this.shown = new Set(); // topics whose snapshot has been on screen
    this.allShown = false;
    this.firstEventShown = false;
    this.labels = labels;
    this.connNode = document.getElementById("conn");
    this.connText = this.connNode.querySelector("span");
    this.latencyNode = document.getElementById("latency");
    this.eventsNode = document.getElementById("events");
    this.violationsNode = document.getElementById("violations");
    this.regionNode = document.getElementById("region");
    this.ticker = null;
  }

  // The skeleton of every wanted topic, at once, before any byte of odds.
  layout(topics) {
    const sections = topics.map((topic) => {
      const view = new TopicView(topic, this.labels(topic));
      this.views.set(topic, view);
      for (let i = 0; i < 3; i += 1) {
        const bone = el("div", "mkt");
        bone.append(el("span", "bone"), el("span", "bone"));
        view.body.append(bone);
      }
      view.node.classList.add("skel");
      return view.node;
    });
    this.root.replaceChildren(...sections);
  }

  relabel() {
    for (const view of this.views.values()) view.title.textContent = this.labels(view.topic);
  }

  onChange(kind, detail) {
    if (kind === "event") {
      this.dirty.set(`${detail.topic} ${detail.market}`, [detail.topic, detail.market]);
      this.schedule();
    } else if (kind === "snapshot") {
      this.dirty.set(detail, [detail, null]);
      this.schedule();
    } else if (kind === "status") {
      this.showStatus();
    } else if (kind === "refused") {
      for (const topic of detail) {
        const view = this.views.get(topic);
        if (view !== undefined) {
          view.node.classList.remove("skel");
          view.body.replaceChildren();
          view.meta.textContent = "";
          view.note.textContent = `refused: ${this.client.refused[topic]}`;
        }
      }
    }
  }

  schedule() {
    if (this.frame !== null) return;
    // Hidden tabs get no animation frames; what is dirty waits, one entry per market.
    this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = null;
    const topics = this.client.checker.topics;
    let newestTs = null;
    const dirty = [...this.dirty.values()];
    this.dirty.clear();
    const replaced = new Set();
    for (const [topic, market] of dirty) {
      const state = topics.get(topic);
      const view = this.views.get(topic);
      if (state === undefined || view === undefined || !state.hasBase) continue;
      if (market === null) {
        view.node.classList.remove("skel");
        view.replace(state);
        replaced.add(topic);
        continue;
      }
      if (replaced.has(topic)) continue; // the snapshot this frame already holds it
      const event = state.markets.get(market);
      if (event !== undefined && view.apply(event)) {
        view.setMeta(state);
        if (typeof event.ts === "number" && (newestTs === null || event.ts > newestTs)) {
          newestTs = event.ts;
        }
      }
    }
    if (newestTs !== null) {
      // ts is Unix ns: a double keeps it to ~256 ns, plenty for milliseconds.
      this.latencyMs = Date.now() - newestTs / 1e6;
      this.latencies.push(this.latencyMs);
      if (this.latencies.length > 200) this.latencies.shift();
    }
    if (this.firstRenderAt === null && replaced.size) {
      this.firstRenderAt = performance.now();
      this.root.setAttribute("aria-busy", "false");
      performance.mark("oddsgate:first-render");
    }
    for (const topic of replaced) this.shown.add(topic);
    if (!this.allShown && replaced.size && this.client.wanted.every((t) => this.shown.has(t))) {
      this.allShown = true; // every wanted topic's odds on screen
      performance.mark("oddsgate:all-snapshots");
    }
    if (!this.firstEventShown && newestTs !== null) {
      this.firstEventShown = true; // a live price moved on screen
      performance.mark("oddsgate:first-event");
    }
    this.showStats();
  }

  showStats() {
    if (this.latencyMs !== null) {
      this.latencyNode.textContent = `latency ${Math.max(0, this.latencyMs).toFixed(0)} ms`;
    }
    this.eventsNode.textContent = `${this.client.stats.events} updates`;
    const bad = this.client.checker.total;
    this.violationsNode.textContent = `${bad} violation${bad === 1 ? "" : "s"}`;
    this.violationsNode.className = bad ? "bad" : "";
    this.showRegion();
  }

  // The region the page is on: its name from the welcome, else its URL's host; with
  // several regions, how often the page moved between them.
  showRegion() {
    const c = this.client;
    if (this.regionNode === null) return;
    let text = `region ${c.region || hostOf(c.regionUrl || c.url)}`;
    if (c.ring.urls.length > 1) {
      const n = c.stats.failovers;
      text += ` · ${n} failover${n === 1 ? "" : "s"}`;
    }
    if (this.regionNode.textContent !== text) this.regionNode.textContent = text;
    this.regionNode.title = c.regionUrl || c.url;
  }

  showStatus() {
    const c = this.client;
    this.connNode.dataset.state = c.status;
    clearInterval(this.ticker);
    this.ticker = null;
    const text = {
      connecting: () => "connecting…",
      connected: () => "connected",
      resuming: () => "resuming…",
      resumed: () => `resumed (${c.stats.resumes})`,
      reset: () => `reset · ${c.detail}`,
      closed: () => `closed · ${c.detail}`,
      reconnecting: () => (c.reconnectAt === null ? "reconnecting…"
        : `reconnecting in ${Math.max(0, Math.round(c.reconnectAt - Date.now()))} ms`),
    }[c.status] || (() => c.status);
    this.connText.textContent = text();
    this.connNode.title = c.detail;
    if (c.status === "reconnecting") {
      this.ticker = setInterval(() => {
        this.connText.textContent = text();
      }, 100);
    }
    this.showStats();
  }
}

// -- 4. start-up ------------------------------------------------------------------------

const DEFAULT_TOPIC_COUNT = 6;

// Without ?topics=: the partition map's high-value markets, then market 1 of the
// first market-level league of each sport, six at most.
export function defaultTopics(pmap) {
  const topics = [...(pmap.high_value || [])];
  for (const sport of pmap.sports || []) {
    const league = (sport.market_level_leagues || [])[0];
    if (league !== undefined) topics.push(`odds:${sport.id}:${league}:1`);
  }
  return [...new Set(topics)].slice(0, DEFAULT_TOPIC_COUNT);
}

function topicLabel(pmap) {
  const names = new Map((pmap?.sports || []).map((s) => [String(s.id), s.name]));
  return (topic) => {
    const [, sport, league, market] = topic.split(":");
    const name = names.get(sport) || `sport ${sport}`;
    const title = name.charAt(0).toUpperCase() + name.slice(1);
    const where = `${title} · league ${league}`;
    return market === undefined ? where : `${where} · market ${market}`;
  };
}

async function fetchTopics() {
  const reply = await fetch("/v1/topics", { cache: "no-cache" });
  if (!reply.ok) throw new Error(`GET /v1/topics: ${reply.status}`);
  return reply.json();
}

function socketUrl(token) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}//${location.host}/ws${query}`;
}

function hostOf(url) {
  try {
    return new URL(url).host;
  } catch {
    return String(url);
  }
}

function isSocketUrl(text) {
  try {
    return /^wss?:$/.test(new URL(text).protocol);
  } catch {
    return false;
  }
}

// ?regions=: comma-separated ws:// or wss:// URLs of the regions' /ws (§8), tried in
// order, each with the token; anything else in the list is ignored. Without any, the
// page's own origin only. index.html's bootstrap opens the first the same way.
export function regionUrls(param, token) {
  const given = (param || "").split(",").map((r) => r.trim()).filter(isSocketUrl);
  if (!given.length) return [socketUrl(token)];
  return given.map((region) => {
    const url = new URL(region);
    if (token) url.searchParams.set("token", token);
    return url.href;
  });
}

function expose(client, board) {
  const plainTopics = () => {
    const out = {};
    for (const [topic, st] of client.checker.topics) {
      const markets = {};
      for (const [market, ev] of st.markets) {
        markets[market] = { seq: ev.seq, status: ev.status, prices: ev.prices, ts: ev.ts };
      }
      out[topic] = { epoch: st.epoch, seq: st.seq, hasBase: st.hasBase, live: st.live, markets };
    }
    return out;
  };
  const api = {
    get status() { return client.status; },
    get statusLog() { return client.statusLog.map((s) => ({ ...s })); },
    get violations() { return client.checker.total; },
    get violationList() { return client.checker.violations.map((v) => ({ ...v })); },
    get counts() { return { ...client.checker.counts }; },
    get topics() { return plainTopics(); },
    get wanted() { return [...client.wanted]; },
    get refused() { return { ...client.refused }; },
    get resumes() { return client.stats.resumes; },
    get resets() { return client.stats.resets; },
    get reconnects() { return client.stats.reconnects; },
    get region() { return client.region; }, // as the last welcome named it
    get regionUrl() { return client.regionUrl; },
    get regions() { return [...client.ring.urls]; },
    get failovers() { return client.stats.failovers; },
    get stats() { return { ...client.stats }; },
    get errors() { return client.errors.slice(); },
    get latencyMs() { return board.latencyMs; },
    get latencies() { return board.latencies.slice(); },
    get welcome() { return client.welcome; },
    get earlySocket() { return client.earlySocket; }, // index.html's socket: adopted?
    // ms since navigation start (bench/scenarios/shell.py reports them): script,
    // skeleton, ws-created, ws-open, welcome (the subscribe leaves in the same turn),
    // snapshot (first received), first-render, all-snapshots (every wanted topic on
    // screen), first-event (a live price applied on screen). index.html's bootstrap
    // marks ws-created and ws-open of the socket it opens, and welcome when it sends
    // the subscribe itself.
    get timings() {
      const marks = {};
      for (const m of performance.getEntriesByType("mark")) {
        if (m.name.startsWith("oddsgate:")) marks[m.name.slice(9)] = m.startTime;
      }
      return marks;
    },
  };
  // Not enumerable, so that serialising window.oddsgate gives plain state only.
  Object.defineProperty(api, "lib", {
    value: { RuleChecker, OddsClient, RegionRing, backoffDelay, movesRegion, regionUrls,
      defaultTopics, TERMINAL_CLOSE_CODES },
  });
  Object.defineProperty(api, "client", { value: client });
  window.oddsgate = api;
}

async function main() {
  performance.mark("oddsgate:script");
  const params = new URLSearchParams(location.search);
  const token = params.get("token"); // else the og_session cookie goes by itself
  const given = (params.get("topics") || "").split(",").map((t) => t.trim()).filter(Boolean);
  const early = window.__ogEarly; // index.html's bootstrap, if it ran: adopted once
  delete window.__ogEarly;
  const pmapReply = (early?.pmap || fetchTopics()).catch(() => null);
  const topics = given.length ? given : defaultTopics((await pmapReply) || {});
  let labels = topicLabel(null);
  let board = null;
  const client = new OddsClient(regionUrls(params.get("regions"), token), topics, {
    onChange: (kind, detail) => {
      if (kind === "status" && detail === "connected"
        && !performance.getEntriesByName("oddsgate:welcome").length) {
        performance.mark("oddsgate:welcome"); // unless the bootstrap subscribed already
      }
      if (kind === "snapshot" && client.stats.snapshots === 1) {
        performance.mark("oddsgate:snapshot");
      }
      board.onChange(kind, detail);
    },
    early,
  });
  board = new Board(document.getElementById("board"), client, (t) => labels(t));
  board.layout(topics);
  performance.mark("oddsgate:skeleton");
  expose(client, board);
  client.start();
  if (client.earlySocket === "none") { // else the bootstrap marked its socket's
    performance.mark("oddsgate:ws-created");
    client.ws?.addEventListener("open", () => performance.mark("oddsgate:ws-open"),
      { once: true });
  }
  addEventListener("online", () => client.retryNow());
  addEventListener("securitypolicyviolation", (e) => client.blocked(e.blockedURI));
  const pmap = await pmapReply;
  if (pmap) {
    labels = topicLabel(pmap);
    board.relabel();
  }
}

if (typeof document !== "undefined" && document.getElementById("board")) main();
