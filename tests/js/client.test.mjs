// The browser client's backoff, resume and heartbeat logic under Node's test runner:
//   node --test tests/js/
// The socket is a scripted stand-in and time is a manual clock, so every branch runs in
// milliseconds; tests/test_client_js.py runs the same module against a real gateway.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HangonClient, backoffDelay, shouldReconnect } from "../../gateway/static/client.js";

class Socket {
  static made = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    Socket.made.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close() {
    this.readyState = 3;
  }
  open() {
    this.readyState = 1;
    this.onopen();
  }
  deliver(frame) {
    this.onmessage({ data: JSON.stringify(frame) });
  }
  drop(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose({ code, reason });
  }
}

class Clock {
  constructor() {
    this.now = 0;
    this.timers = new Map();
    this.next = 1;
  }
  setTimeout = (fn, ms) => {
    const id = this.next++;
    this.timers.set(id, { at: this.now + ms, fn });
    return id;
  };
  clearTimeout = (id) => {
    this.timers.delete(id);
  };
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      const due = [...this.timers].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at);
      if (due.length === 0) break;
      const [id, t] = due[0];
      this.timers.delete(id);
      this.now = t.at;
      t.fn();
    }
    this.now = until;
  }
}

class Storage {
  constructor() {
    this.items = new Map();
  }
  getItem(k) {
    return this.items.has(k) ? this.items.get(k) : null;
  }
  setItem(k, v) {
    this.items.set(k, String(v));
  }
  removeItem(k) {
    this.items.delete(k);
  }
}

const CALLER = { user_id: "u1", call_id: "c1" };

function setup(storage = new Storage()) {
  Socket.made = [];
  const clock = new Clock();
  const events = [];
  const client = new HangonClient("ws://gw/ws", CALLER, {
    WebSocket: Socket,
    storage,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random: () => 0.5,
  });
  for (const type of ["restored", "message", "state", "reconnecting", "closed"]) {
    client.addEventListener(type, (e) => events.push([type, e.detail]));
  }
  return { client, clock, events, storage };
}

function welcome(overrides = {}) {
  return {
    type: "welcome",
    protocol: 1,
    session_id: "s1",
    resume_token: "tok1",
    resumed: false,
    state: { form_answers: {} },
    version: 0,
    seq: 0,
    replay: "full",
    ...overrides,
  };
}

test("backoff is exponential with full jitter and capped", () => {
  const opts = { initialDelay: 500, maxDelay: 30000 };
  assert.equal(backoffDelay(0, { ...opts, random: () => 0.999 }) < 500, true);
  assert.equal(backoffDelay(3, { ...opts, random: () => 0.5 }), 2000);
  assert.equal(backoffDelay(20, { ...opts, random: () => 0.5 }), 15000);
  assert.equal(backoffDelay(5, { ...opts, random: () => 0 }), 0);
});

test("close codes: drops and retryable codes resume, bye, protocol errors and 4500+ stop", () => {
  for (const code of [null, 1001, 1006, 1011, 1012, 1013, 4001, 4003, 4499]) {
    assert.equal(shouldReconnect(code), true, String(code));
  }
  for (const code of [1000, 1003, 1007, 1008, 1009, 4500, 4501, 4999]) {
    assert.equal(shouldReconnect(code), false, String(code));
  }
});

test("a drop resumes with token and last_seq, re-sends the unacked turn, skips replayed messages", async () => {
  const { client, clock, events } = setup();
  client.start();
  let ws = Socket.made[0];
  ws.open();
  assert.deepEqual(ws.sent[0], { type: "hello", caller: CALLER, last_seq: 0 });
  ws.deliver(welcome());
  ws.deliver({ type: "msg", seq: 1, data: { say: "hi" } });
  ws.deliver({ type: "msg", seq: 2, data: { say: "name?" } });
  assert.deepEqual(ws.sent.slice(-1)[0], { type: "ack", seq: 2 });
  const acked = client.turn({ turnId: "t1", text: "Ada" });
  assert.deepEqual(ws.sent.slice(-1)[0], { type: "turn", turn_id: "t1", text: "Ada" });
  ws.drop(1006);
  const reconnecting = events.find(([t]) => t === "reconnecting")[1];
  assert.deepEqual(reconnecting, { code: null, delay: 250, attempt: 1 });
  assert.equal(Socket.made.length, 1);
  clock.advance(250);
  ws = Socket.made[1];
  ws.open();
  assert.deepEqual(ws.sent[0], { type: "hello", caller: CALLER, last_seq: 2, resume_token: "tok1" });
  ws.deliver(welcome({ resumed: true, resume_token: "tok2", version: 1, state: { form_answers: { name: "Ada" } } }));
  assert.deepEqual(ws.sent[1], { type: "turn", turn_id: "t1", text: "Ada" });
  ws.deliver({ type: "msg", seq: 2, data: { say: "name?" } }); // replayed: already handled
  ws.deliver({ type: "msg", seq: 3, data: { say: "date?" } });
  ws.deliver({ type: "ack", turn_id: "t1", version: 1 });
  assert.equal(await acked, 1);
  const messages = events.filter(([t]) => t === "message").map(([, d]) => d.seq);
  assert.deepEqual(messages, [1, 2, 3]);
  const restored = events.filter(([t]) => t === "restored").map(([, d]) => d.resumed);
  assert.deepEqual(restored, [false, true]);
  assert.equal(client.resumeToken, "tok2");
});

test("a page reload resumes from sessionStorage", () => {
  const first = setup();
  first.client.start();
  const ws = Socket.made[0];
  ws.open();
  ws.deliver(welcome());
  ws.deliver({ type: "msg", seq: 1, data: {} });
  const again = setup(first.storage);
  again.client.start();
  Socket.made[0].open();
  assert.deepEqual(Socket.made[0].sent[0], { type: "hello", caller: CALLER, last_seq: 1, resume_token: "tok1" });
});

test("a terminal close stops the client, fails waiting turns and forgets the session", async () => {
  const { client, clock, events, storage } = setup();
  client.start();
  const ws = Socket.made[0];
  ws.open();
  ws.deliver(welcome());
  const pending = client.turn({ turnId: "t1", form: { a: 1 } });
  ws.drop(4500, "session replaced by a newer connection");
  await assert.rejects(pending, (err) => err.code === 4500);
  clock.advance(60000);
  assert.equal(Socket.made.length, 1);
  assert.equal(client.status, "closed");
  assert.deepEqual(events.slice(-1)[0], ["closed", { code: 4500, reason: "session replaced by a newer connection" }]);
  assert.equal(storage.items.size, 0);
});

test("backoff grows over failed attempts and starts small again after a welcome", () => {
  const { client, clock, events } = setup();
  client.start();
  for (let i = 0; i < 3; i++) {
    Socket.made.at(-1).drop(1006);
    clock.advance(100000);
  }
  const delays = events.filter(([t]) => t === "reconnecting").map(([, d]) => d.delay);
  assert.deepEqual(delays, [250, 500, 1000]);
  Socket.made.at(-1).open();
  Socket.made.at(-1).deliver(welcome());
  Socket.made.at(-1).drop(1012, "service restart");
  assert.equal(events.filter(([t]) => t === "reconnecting").at(-1)[1].delay, 250);
});

test("a retry_after hint in an error frame is a floor on the next delay", () => {
  const { client, events } = setup();
  client.start();
  const ws = Socket.made[0];
  ws.open();
  ws.deliver({ type: "error", code: "overloaded", message: "busy", close_code: 1013, reconnect: true, retry_after: 3 });
  ws.drop(1013, "try again later");
  assert.equal(events.find(([t]) => t === "reconnecting")[1].delay, 3000);
});

test("a hint restarts the backoff: the delay is the hint, not the backoff grown while the gateway was down", () => {
  const { client, events } = setup();
  client.start();
  for (let i = 0; i < 6; i += 1) {
    Socket.made.at(-1).drop(1006, "");  // unreachable six times: the backoff cap grows to 16 s
    client._connect();
  }
  const ws = Socket.made.at(-1);
  ws.open();
  ws.deliver({ type: "error", code: "overloaded", message: "busy", close_code: 1013, reconnect: true, retry_after: 2 });
  ws.drop(1013, "try again later");
  assert.equal(events.filter(([t]) => t === "reconnecting").at(-1)[1].delay, 2000);
});

test("heartbeat: no frame within the timeout after a ping drops the connection and reconnects", () => {
  const { client, clock, events } = setup();
  client.start();
  const ws = Socket.made[0];
  ws.open();
  ws.deliver(welcome());
  clock.advance(15000);
  assert.deepEqual(ws.sent.at(-1), { type: "ping" });
  ws.deliver({ type: "pong" });
  clock.advance(15000);
  assert.deepEqual(ws.sent.at(-1), { type: "ping" });
  clock.advance(10000); // no pong: dead
  assert.equal(ws.readyState, 3);
  assert.equal(events.at(-1)[0], "reconnecting");
  clock.advance(1000);
  assert.equal(Socket.made.length, 2);
});

test("bye ends the session and clears storage", () => {
  const { client, storage } = setup();
  client.start();
  const ws = Socket.made[0];
  ws.open();
  ws.deliver(welcome());
  client.bye();
  assert.deepEqual(ws.sent.at(-1), { type: "bye" });
  ws.drop(1000, "bye");
  assert.equal(client.status, "closed");
  assert.equal(storage.items.size, 0);
});

test("an error without a close event (Node 20's WebSocket) still reconnects, once", () => {
  const { client, clock, events } = setup();
  client.start();
  const ws = Socket.made[0];
  // Closing a failed socket fires error again, synchronously, in Node 20.
  ws.close = () => ws.onerror?.({});
  ws.onerror({});
  assert.equal(events.filter(([t]) => t === "reconnecting").length, 1);
  clock.advance(1000);
  assert.equal(Socket.made.length, 2);
});

test("a turn on a closed client is refused at once", async () => {
  const { client } = setup();
  client.start();
  Socket.made[0].open();
  Socket.made[0].deliver(welcome());
  client.close();
  await assert.rejects(client.turn({ text: "late" }), /closed/);
});

test("ids without crypto.randomUUID (plain http on a LAN address)", async () => {
  const { randomId } = await import("../../gateway/static/client.js");
  const saved = globalThis.crypto.randomUUID;
  Object.defineProperty(globalThis.crypto, "randomUUID", { value: undefined, configurable: true });
  try {
    const id = randomId();
    assert.match(id, /^[0-9a-f]{32}$/);
    assert.notEqual(id, randomId());
  } finally {
    Object.defineProperty(globalThis.crypto, "randomUUID", { value: saved, configurable: true });
  }
});

test("options passed as undefined keep their defaults", () => {
  Socket.made = [];
  const clock = new Clock();
  const events = [];
  const client = new HangonClient("ws://gw/ws", CALLER, {
    WebSocket: Socket, storage: null, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
    random: () => 0.5, maxDelay: undefined, initialDelay: undefined,
  });
  client.addEventListener("reconnecting", (e) => events.push(e.detail.delay));
  client.start();
  Socket.made[0].drop(1006);
  assert.deepEqual(events, [250]);
});

test("a token goes with every hello; a token function is called for each, and token_expired fetches a fresh one", async () => {
  Socket.made = [];
  const clock = new Clock();
  let minted = 0;
  const client = new HangonClient("ws://gw/ws", CALLER, {
    WebSocket: Socket,
    storage: null,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random: () => 0.5,
    token: async () => `jwt-${++minted}`,
  });
  client.start();
  let ws = Socket.made[0];
  ws.open();
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(ws.sent[0], { type: "hello", caller: CALLER, last_seq: 0, token: "jwt-1" });
  ws.deliver({ type: "error", code: "token_expired", message: "expired", close_code: 1008, reconnect: false });
  ws.drop(1008, "policy violation");
  assert.equal(client.status, "reconnecting");
  clock.advance(1000);
  ws = Socket.made[1];
  ws.open();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(ws.sent[0].token, "jwt-2");

  const fixed = setup();
  fixed.client.options.token = "static-jwt";
  fixed.client.start();
  const first = Socket.made[0];
  first.open();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(first.sent[0].token, "static-jwt");
  first.deliver({ type: "error", code: "token_expired", message: "expired", close_code: 1008, reconnect: false });
  first.drop(1008, "policy violation");
  assert.equal(fixed.client.status, "closed"); // nothing can make a fresh one
});
