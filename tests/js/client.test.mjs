// Unit tests of the browser client (node --test). A fake WebSocket and fake timers: no server.
import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay, createWebSocketClient, defaultUrl } from "../../services/gateway/static/client.js";

class FakeSocket {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.instances.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  // test helpers
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  receive(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
}

function harness(options = {}) {
  FakeSocket.instances = [];
  const timers = [];
  const events = new EventTarget();
  const seen = [];
  for (const name of ["connected", "disconnected", "reconnecting", "partial_applications", "notification", "entity_event"]) {
    events.addEventListener(`portico:${name}`, (e) => seen.push([name, e.detail]));
  }
  const client = createWebSocketClient("ws://test/wss", {
    WebSocket: FakeSocket,
    eventTarget: events,
    setTimeout: (fn, ms) => timers.push({ fn, ms, id: timers.length + 1 }) && timers.length,
    clearTimeout: (id) => {
      const timer = timers.find((t) => t.id === id);
      if (timer) timer.cancelled = true;
    },
    random: () => 0.5,
    ...options,
  });
  const socket = () => FakeSocket.instances.at(-1);
  const fire = (predicate = () => true) => {
    const timer = timers.find((t) => !t.cancelled && !t.fired && predicate(t));
    assert.ok(timer, "a pending timer");
    timer.fired = true;
    timer.fn();
    return timer;
  };
  return { client, socket, timers, fire, seen, names: () => seen.map(([n]) => n) };
}

const cart = (seq, extra = {}) => ({
  type: "partial_applications_response",
  data: { error: false, status: "success", applications: [], count: seq, seq, source: "server_push", ...extra },
});

test("default url follows the page", () => {
  assert.equal(defaultUrl({ protocol: "https:", host: "booking.example.no" }), "wss://booking.example.no/wss");
  assert.equal(defaultUrl({ protocol: "http:", host: "localhost:8000" }), "ws://localhost:8000/wss");
});

test("backoff is exponential with full jitter, capped", () => {
  const opts = { baseDelayMs: 500, maxDelayMs: 30000 };
  assert.equal(backoffDelay(0, opts, () => 0.999), 499);
  assert.equal(backoffDelay(3, opts, () => 0.999), 3996);
  assert.equal(backoffDelay(20, opts, () => 0.999), 29970);
  assert.equal(backoffDelay(5, opts, () => 0), 0);
  const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(4, opts)));
  assert.ok(spread.size > 10, "random, not fixed");
});

test("pushes are dispatched with isServerPush, older snapshots are dropped", () => {
  const h = harness();
  h.socket().open();
  h.socket().receive(cart(5));
  h.socket().receive(cart(4)); // late and older
  h.socket().receive(cart(5)); // the same push again
  h.socket().receive(cart(7));
  const carts = h.seen.filter(([n]) => n === "partial_applications").map(([, d]) => d);
  assert.deepEqual(carts.map((d) => d.seq), [5, 7]);
  assert.ok(carts.every((d) => d.isServerPush));
  assert.equal(h.client.getStatus().lastSeq, 7);
});

test("getPartialApplications resolves with the reply to its own request only", async () => {
  const h = harness();
  h.socket().open();
  const promise = h.client.getPartialApplications();
  const request = h.socket().sent.find((m) => m.type === "get_partial_applications");
  assert.ok(request.requestId);
  h.socket().receive(cart(3)); // a push is not the answer
  h.socket().receive({ ...cart(4, { source: undefined }), requestId: "someone-else" });
  h.socket().receive({ ...cart(5, { source: undefined }), requestId: request.requestId });
  const reply = await promise;
  assert.equal(reply.seq, 5);
  assert.equal(reply.isServerPush, false);
});

test("getPartialApplications times out cleanly, and rejects when not connected", async () => {
  const h = harness({ requestTimeoutMs: 1234 });
  await assert.rejects(h.client.getPartialApplications(), /not connected/);
  h.socket().open();
  const promise = h.client.getPartialApplications();
  h.fire((t) => t.ms === 1234);
  await assert.rejects(promise, /no reply within 1234 ms/);
});

test("reconnects with back-off, keeps the same client, restores session and rooms", () => {
  const h = harness();
  const first = h.socket();
  first.open();
  h.client.updateSession("abc");
  h.client.updateUserInfo(17);
  h.client.subscribe("resource", 42);
  first.drop();
  assert.ok(h.names().includes("reconnecting"));
  const wait = h.fire((t) => t.fn.name === "connect");
  assert.equal(wait.ms, 250, "attempt 0: up to 500 ms, jitter 0.5");
  const second = h.socket();
  assert.notEqual(second, first);
  second.open();
  assert.deepEqual(
    second.sent.map((m) => m.type),
    ["update_session", "update_user_info", "subscribe"],
  );
  assert.equal(h.seen.filter(([n]) => n === "connected").at(-1)[1].reconnected, true);
  // Consecutive failures back off further.
  second.drop();
  h.fire((t) => t.fn.name === "connect" && !t.fired);
  h.socket().drop();
  const third = h.timers.filter((t) => t.fn.name === "connect").at(-1);
  assert.equal(third.ms, 500, "attempt 1: up to 1000 ms");
});

test("reconnect_required: waits retryAfterMs, then reconnects", () => {
  const h = harness();
  h.socket().open();
  h.socket().receive({ type: "reconnect_required", retryAfterMs: 4321 });
  const wait = h.timers.filter((t) => t.fn.name === "connect").at(-1);
  assert.equal(wait.ms, 4321);
  h.fire((t) => t === wait);
  assert.equal(FakeSocket.instances.length, 2);
});

test("after a reconnect without a cart push, it asks for the cart", () => {
  const h = harness({ refreshAfterMs: 3000 });
  h.socket().open();
  h.socket().receive(cart(1));
  h.socket().drop();
  h.fire((t) => t.fn.name === "connect");
  h.socket().open();
  h.fire((t) => t.ms === 3000 && !t.cancelled && !t.fired && t !== h.timers[0]);
  assert.ok(h.socket().sent.some((m) => m.type === "get_partial_applications"));
});

test("a cart pushed on joining makes the refresh unnecessary", () => {
  const h = harness({ refreshAfterMs: 3000 });
  h.socket().open();
  h.socket().receive(cart(1));
  h.fire((t) => t.ms === 3000);
  assert.ok(!h.socket().sent.some((m) => m.type === "get_partial_applications"));
});

test("server_ping is answered; notifications and entity events are dispatched", () => {
  const h = harness();
  h.socket().open();
  h.socket().receive({ type: "server_ping", id: "ping_1" });
  assert.deepEqual(h.socket().sent.at(-1), { type: "pong", reply_to: "ping_1" });
  h.socket().receive({ type: "notification", message: "hi" });
  h.socket().receive({ type: "entity_event", entityType: "resource", entityId: 1 });
  assert.ok(h.names().includes("notification") && h.names().includes("entity_event"));
});

test("close() stops reconnecting and rejects pending requests", async () => {
  const h = harness();
  h.socket().open();
  const promise = h.client.getPartialApplications();
  h.client.close();
  await assert.rejects(promise, /client closed/);
  assert.equal(h.client.getStatus().status, "closed");
  assert.ok(!h.timers.some((t) => t.fn.name === "connect"));
});

test("sendMessage keeps the old signature", () => {
  const h = harness();
  h.socket().open();
  assert.equal(h.client.sendMessage("session_message", "hello", { data: { x: 1 } }), true);
  assert.deepEqual(h.socket().sent.at(-1), { data: { x: 1 }, type: "session_message", message: "hello" });
});
