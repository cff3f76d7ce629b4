// hangon browser client: protocol v1 over a WebSocket that survives drops and page reloads.
// Dependency-free ES module; the gateway serves it at /client.js, and it may be vendored.
// Types: /client.d.ts. Protocol: docs/protocol.md.
//
//   import { HangonClient } from "/client.js";
//   const client = new HangonClient("wss://example.com/ws", { user_id: "u1", call_id: "c1" });
//   client.addEventListener("message", (e) => console.log(e.detail.seq, e.detail.data));
//   client.addEventListener("restored", (e) => console.log(e.detail.state));
//   client.start();
//   const version = await client.turn({ text: "Ada" });

/** Defaults, in milliseconds where they are durations. */
export const DEFAULTS = Object.freeze({
  initialDelay: 500,
  maxDelay: 30000,
  heartbeatInterval: 15000,
  heartbeatTimeout: 10000,
  storageKey: "hangon",
});

const TERMINAL = new Set([1000, 1003, 1007, 1008, 1009]);

/** Whether a connection closed with `code` (null: no close frame) is resumed. */
export function shouldReconnect(code) {
  if (code === null || code === undefined) return true;
  return !(TERMINAL.has(code) || (code >= 4500 && code <= 4999));
}

/** The delay before reconnect attempt `attempt` (0, 1, ...): exponential, full jitter. */
export function backoffDelay(attempt, { initialDelay, maxDelay, random = Math.random }) {
  const bound = Math.min(maxDelay, initialDelay * 2 ** attempt);
  return random() * bound;
}

/** A random ID; crypto.randomUUID exists only in secure contexts (HTTPS, localhost). */
export function randomId() {
  if (typeof globalThis.crypto?.randomUUID === "function") return globalThis.crypto.randomUUID();
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function defaultStorage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // storage disabled by the browser
  }
}

/**
 * One caller's session across connections and page reloads.
 *
 * Events (CustomEvent, details in client.d.ts): "restored" after every welcome, "message"
 * once per agent message in order, "state" when the agent changes the state,
 * "reconnecting" before each reconnect, "status" on every status change, "closed" when the
 * client stops for good.
 */
export class HangonClient extends EventTarget {
  constructor(url, caller, options = {}) {
    super();
    this.url = url;
    this.caller = caller;
    // An option passed as undefined keeps its default (a NaN delay would spin).
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined));
    this.options = { ...DEFAULTS, ...given };
    this.tenant = this.options.tenant ?? null;
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.setTimeout = options.setTimeout ?? globalThis.setTimeout.bind(globalThis);
    this.clearTimeout = options.clearTimeout ?? globalThis.clearTimeout.bind(globalThis);
    this.random = options.random ?? Math.random;
    this.status = "idle";
    this.sessionId = null;
    this.resumeToken = null;
    this.lastSeq = 0;
    this.state = {};
    this.version = 0;
    this.ws = null;
    this.attempt = 0;
    this.retryAfter = 0;
    this.expired = false; // the gateway refused the token as expired; options.token makes new ones
    this.resending = false; // a resend of the waiting turns is due, after a nack
    this.unacked = new Map(); // turn_id -> { frame, resolve, reject }
    this.timers = { reconnect: null, heartbeat: null, deadline: null };
    this.saidBye = false;
    this.closedWith = null;
    this._load();
  }

  /** Connect (resuming what sessionStorage holds for this caller). */
  start() {
    if (this.status === "idle" || this.status === "closed") this._connect();
  }

  /** Send a turn; resolves with the version its ack names, across reconnects. */
  turn({ turnId, text, form, context } = {}) {
    if (this.status === "closed") {
      const error = new Error("hangon client is closed");
      error.code = this.closedWith;
      return Promise.reject(error);
    }
    const turn_id = turnId ?? randomId();
    const message = { type: "turn", turn_id };
    if (text !== undefined) message.text = text;
    if (form !== undefined) message.form = form;
    if (context !== undefined) message.context = context;
    const frame = JSON.stringify(message);
    return new Promise((resolve, reject) => {
      this.unacked.set(turn_id, { frame, resolve, reject });
      if (this.status === "open") this.ws.send(frame);
    });
  }

  /** End the session; the client then stops and forgets it. */
  bye() {
    this.saidBye = true;
    if (this.status === "open") this.ws.send(JSON.stringify({ type: "bye" }));
  }

  /** Stop without ending the session: it stays resumable (from storage, too). */
  close() {
    this._stop(1000, "closed by the client");
  }

  get storageId() {
    return `${this.options.storageKey}:${JSON.stringify([this.tenant, this.caller])}`;
  }

  _load() {
    const raw = this.storage?.getItem(this.storageId);
    if (!raw) return;
    try {
      const saved = JSON.parse(raw);
      this.resumeToken = saved.resume_token ?? null;
      this.lastSeq = saved.last_seq ?? 0;
      this.sessionId = saved.session_id ?? null;
    } catch {
      this.storage.removeItem(this.storageId);
    }
  }

  _save() {
    if (!this.storage) return;
    const saved = { resume_token: this.resumeToken, last_seq: this.lastSeq, session_id: this.sessionId };
    this.storage.setItem(this.storageId, JSON.stringify(saved));
  }

  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this._emit("status", { status });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _connect() {
    this._setStatus(this.attempt === 0 && this.sessionId === null ? "connecting" : "reconnecting");
    const ws = new this.WebSocket(this.url);
    this.ws = ws;
    ws.onopen = async () => {
      const hello = { type: "hello", caller: this.caller, last_seq: this.lastSeq };
      if (this.tenant !== null) hello.tenant = this.tenant;
      if (this.resumeToken !== null) hello.resume_token = this.resumeToken;
      const token = this.options.token;
      if (token != null) {
        try {
          hello.token = typeof token === "function" ? await token() : token;
        } catch {
          // No token to be had now: drop this connection and retry later.
          if (ws === this.ws) ws.close();
          return;
        }
        if (ws !== this.ws) return; // dropped while the token was being fetched
      }
      ws.send(JSON.stringify(hello));
      this._beat();
    };
    ws.onmessage = (event) => this._receive(ws, event.data);
    ws.onclose = (event) => this._closed(ws, event.code === 1005 || event.code === 1006 ? null : event.code, event.reason);
    // Browsers follow an error with a close event, but not every implementation does
    // (Node 20's WebSocket leaves a refused connection CONNECTING): an error ends the
    // connection here, and a close event that follows finds it already handled.
    ws.onerror = () => {
      if (ws !== this.ws) return;
      // Detached first: closing a failed socket may fire error again, synchronously.
      ws.onerror = ws.onclose = ws.onmessage = null;
      this._closed(ws, null, "connection error");
      try {
        ws.close();
      } catch {
        // not open yet, or already failed: nothing to close
      }
    };
  }

  _receive(ws, raw) {
    if (ws !== this.ws) return;
    this._alive();
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return;
    }
    switch (frame.type) {
      case "welcome":
        return this._welcome(ws, frame);
      case "msg":
        if (frame.seq <= this.lastSeq) return; // already handled
        this.lastSeq = frame.seq;
        this._save();
        this._emit("message", { seq: frame.seq, data: frame.data });
        ws.send(JSON.stringify({ type: "ack", seq: frame.seq }));
        return;
      case "state":
        this.state = frame.state;
        this.version = frame.version;
        this._emit("state", { state: frame.state, version: frame.version });
        return;
      case "nack":
        // Not stored (the store is out): after the hint, send every turn still waiting
        // again, in order, on this connection (the gateway nacks turns sent after a nacked one).
        if (!this.resending) {
          this.resending = true;
          this.setTimeout(() => {
            this.resending = false;
            if (ws === this.ws) for (const { frame: text } of this.unacked.values()) ws.send(text);
          }, (frame.retry_after ?? 1) * 1000);
        }
        return;
      case "ack": {
        const pending = this.unacked.get(frame.turn_id);
        this.version = Math.max(this.version, frame.version);
        if (pending) {
          this.unacked.delete(frame.turn_id);
          pending.resolve(frame.version);
        }
        return;
      }
      case "error":
        if (typeof frame.retry_after === "number") this.retryAfter = frame.retry_after * 1000;
        // An expired token is no reason to stop when a fresh one can be fetched.
        if (frame.code === "token_expired" && typeof this.options.token === "function") this.expired = true;
        return;
      default:
        return; // pong, or a type this version does not know
    }
  }

  _welcome(ws, frame) {
    if (frame.degraded === true) {
      // The store is out: nothing here is authoritative. Keep the position and token (none
      // is offered to a client that sent none); the real welcome follows.
      this.resumeToken = this.resumeToken ?? (frame.resume_token || null);
      this.attempt = 0;
      this._setStatus("open");
      this._emit("restored", { sessionId: frame.session_id, resumed: false, stale: false, state: {}, version: 0, replayFrom: null, degraded: true });
      for (const { frame: text } of this.unacked.values()) ws.send(text);
      return;
    }
    if (frame.session_id !== this.sessionId) this.lastSeq = 0; // new session: messages from 1
    if (typeof frame.replay_from === "number") this.lastSeq = frame.replay_from - 1;
    this.sessionId = frame.session_id;
    this.resumeToken = frame.resume_token;
    this.state = frame.state;
    this.version = frame.version;
    this.attempt = 0;
    this.retryAfter = 0;
    this._save();
    this._setStatus("open");
    this._emit("restored", {
      sessionId: frame.session_id,
      resumed: frame.resumed,
      stale: frame.stale === true,
      state: frame.state,
      version: frame.version,
      replayFrom: frame.replay_from ?? null,
      degraded: false,
    });
    for (const { frame: text } of this.unacked.values()) ws.send(text);
    if (this.saidBye) ws.send(JSON.stringify({ type: "bye" }));
  }

  // Heartbeat: a ping every heartbeatInterval; no frame within heartbeatTimeout of it
  // means the connection is dead (browsers cannot see WebSocket pings).
  _beat() {
    this.clearTimeout(this.timers.heartbeat);
    this.timers.heartbeat = this.setTimeout(() => {
      if (this.ws === null || this.ws.readyState !== 1) return;
      this.ws.send(JSON.stringify({ type: "ping" }));
      this.clearTimeout(this.timers.deadline);
      const ws = this.ws;
      this.timers.deadline = this.setTimeout(() => this._dead(ws), this.options.heartbeatTimeout);
    }, this.options.heartbeatInterval);
  }

  _alive() {
    this.clearTimeout(this.timers.deadline);
    this.timers.deadline = null;
    this._beat();
  }

  _dead(ws) {
    if (ws !== this.ws) return;
    ws.onerror = ws.onclose = ws.onmessage = null;
    this._closed(ws, null, "no heartbeat");
    ws.close();
  }

  _closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.clearTimeout(this.timers.heartbeat);
    this.clearTimeout(this.timers.deadline);
    if (this.status === "closed") return;
    if ((this.saidBye && code === 1000) || (!shouldReconnect(code) && code >= 4500)) {
      this._forget(); // ended, or not ours to resume any more
      return this._stop(code, reason);
    }
    const expired = this.expired;
    this.expired = false;
    if (!shouldReconnect(code) && !expired) return this._stop(code, reason);
    // A hint means the gateway is up and said when to come back: the backoff built up while
    // it was unreachable no longer applies, and starts again from its first step.
    if (this.retryAfter > 0) this.attempt = 0;
    const delay = Math.max(this.retryAfter, backoffDelay(this.attempt, { ...this.options, random: this.random }));
    this.attempt += 1;
    this._setStatus("reconnecting");
    this._emit("reconnecting", { code, delay, attempt: this.attempt });
    this.timers.reconnect = this.setTimeout(() => this._connect(), delay);
  }

  _forget() {
    this.storage?.removeItem(this.storageId);
    this.sessionId = null;
    this.resumeToken = null;
    this.lastSeq = 0;
    this.saidBye = false;
  }

  _stop(code, reason) {
    for (const t of Object.values(this.timers)) this.clearTimeout(t);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onerror = ws.onclose = ws.onmessage = null;
      try {
        ws.close();
      } catch {
        // already failed
      }
    }
    const error = new Error(`hangon client closed (${code}): ${reason}`);
    error.code = code;
    for (const { reject } of this.unacked.values()) reject(error);
    this.unacked.clear();
    this.closedWith = code;
    this._setStatus("closed");
    this._emit("closed", { code, reason });
  }
}
