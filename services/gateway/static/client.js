/**
 * Portico Push browser client: a dependency-free ES module, a drop-in for the old client.js.
 *
 *   import { createWebSocketClient } from "/wss/client.js";
 *   const client = createWebSocketClient();          // ws(s)://<this host>/wss
 *   window.addEventListener("portico:partial_applications", (e) => render(e.detail));
 *
 * Better than the old client where it mattered:
 *  - reconnects with exponential back-off and full jitter (the old fixed 5 s made every tab
 *    come back at the same instant after a restart), honouring `reconnect_required`'s
 *    `retryAfterMs`; the same client object keeps working across reconnects;
 *  - `getPartialApplications()` resolves with the reply to *its* request (matched by
 *    requestId), and rejects after a timeout instead of hanging;
 *  - drops a cart snapshot older than the one it has (`seq`), and makes sure it has the
 *    current cart after every reconnect, so an update published during the gap is not lost;
 *  - re-sends its session, user and entity subscriptions after reconnecting.
 *
 * Window events (detail in parentheses): portico:connected ({url, reconnected}),
 * portico:disconnected ({code, reason}), portico:reconnecting ({attempt, delayMs}),
 * portico:partial_applications ({...data, isServerPush}), portico:notification (message),
 * portico:server_message, portico:entity_event, portico:room_message, portico:refresh_bookinguser,
 * portico:session_required, portico:room_joined, portico:error, and portico:message for every
 * message received.
 */

export const DEFAULTS = Object.freeze({
  requestTimeoutMs: 10000, // getPartialApplications() rejects after this
  baseDelayMs: 500, // first reconnect waits up to this (full jitter)...
  maxDelayMs: 30000, // ...doubling per attempt, capped here
  refreshAfterMs: 3000, // after (re)connecting, ask for the cart if none arrived by then
});

/** ws(s)://<host of the page>/wss */
export function defaultUrl(location = globalThis.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/wss`;
}

/** Full jitter: uniform in [0, min(max, base * 2^attempt)). */
export function backoffDelay(attempt, { baseDelayMs, maxDelayMs } = DEFAULTS, random = Math.random) {
  return Math.floor(random() * Math.min(maxDelayMs, baseDelayMs * 2 ** attempt));
}

export function createWebSocketClient(url, options = {}) {
  const opts = { ...DEFAULTS, ...options };
  const WebSocketImpl = opts.WebSocket || globalThis.WebSocket;
  const events = opts.eventTarget || globalThis;
  const setTimer = opts.setTimeout || ((fn, ms) => globalThis.setTimeout(fn, ms));
  const clearTimer = opts.clearTimeout || ((id) => globalThis.clearTimeout(id));
  const random = opts.random || Math.random;
  const target = url || defaultUrl();

  let socket = null;
  let status = "connecting";
  let attempt = 0; // consecutive failed connections
  let everConnected = false;
  let closedByUser = false;
  let retryAfterMs = null; // from reconnect_required
  let reconnectTimer = null;
  let refreshTimer = null;
  let cartSinceOpen = false;
  let lastSeq = -Infinity;
  let sessionId = opts.sessionId || null; // only when set through updateSession()
  let userId = null;
  let requestCounter = 0;
  const subscriptions = new Map(); // "type/id" -> {entityType, entityId}
  const pending = new Map(); // requestId -> {resolve, reject, timer}

  function emit(name, detail) {
    events.dispatchEvent(new CustomEvent(`portico:${name}`, { detail }));
  }

  function send(message) {
    if (!socket || socket.readyState !== 1) return false;
    socket.send(JSON.stringify(message));
    return true;
  }

  function connect() {
    reconnectTimer = null;
    status = everConnected || attempt > 0 ? "reconnecting" : "connecting";
    let ws;
    try {
      ws = new WebSocketImpl(target);
    } catch (error) {
      emit("error", { code: "CONNECT_FAILED", message: String(error) });
      scheduleReconnect();
      return;
    }
    socket = ws;
    ws.onopen = () => onOpen(ws);
    ws.onmessage = (event) => onMessage(ws, event);
    ws.onclose = (event) => onClose(ws, event);
    ws.onerror = () => {}; // a close event always follows
  }

  function onOpen(ws) {
    if (ws !== socket) return;
    const reconnected = everConnected;
    everConnected = true;
    attempt = 0;
    status = "open";
    cartSinceOpen = false;
    if (sessionId) send({ type: "update_session", sessionId });
    if (userId !== null) send({ type: "update_user_info", userId });
    for (const { entityType, entityId } of subscriptions.values()) send({ type: "subscribe", entityType, entityId });
    emit("connected", { url: target, reconnected });
    // The gateway pushes the current cart on joining a session; if none came (no session yet,
    // or a lost reply), ask, so a change made while we were away is never missed.
    refreshTimer = setTimer(() => {
      refreshTimer = null;
      if (!cartSinceOpen && status === "open") getPartialApplications().catch(() => {});
    }, opts.refreshAfterMs);
  }

  function onMessage(ws, event) {
    if (ws !== socket) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!message || typeof message !== "object") return;
    emit("message", message);
    switch (message.type) {
      case "partial_applications_response":
        onCart(message);
        break;
      case "server_ping":
        send({ type: "pong", reply_to: message.id ?? null });
        break;
      case "reconnect_required":
        retryAfterMs = Number.isFinite(message.retryAfterMs) ? Math.max(0, message.retryAfterMs) : null;
        ws.close(1000, "reconnect_required");
        break;
      case "notification":
      case "cache_invalidation":
        emit("notification", message);
        break;
      case "server_message":
        emit("server_message", message);
        emit("notification", message);
        break;
      case "entity_event":
      case "room_message":
      case "refresh_bookinguser":
      case "room_joined":
      case "error":
        emit(message.type, message);
        break;
      case "session_id_required":
        emit("session_required", message);
        break;
      default:
        break;
    }
  }

  function onCart(message) {
    const data = message.data && typeof message.data === "object" ? message.data : {};
    const isServerPush = data.source === "server_push";
    const detail = { ...data, isServerPush };
    const request = message.requestId != null ? pending.get(message.requestId) : undefined;
    if (request) {
      pending.delete(message.requestId);
      clearTimer(request.timer);
      request.resolve(detail);
    }
    if (!data.error) cartSinceOpen = true;
    if (typeof data.seq === "number") {
      // Older than what we show, or the same push again: never step back.
      if (data.seq < lastSeq || (isServerPush && data.seq === lastSeq)) return;
      lastSeq = data.seq;
    }
    emit("partial_applications", detail);
  }

  function onClose(ws, event) {
    if (ws !== socket) return;
    socket = null;
    if (refreshTimer !== null) {
      clearTimer(refreshTimer);
      refreshTimer = null;
    }
    status = closedByUser ? "closed" : "reconnecting";
    emit("disconnected", { code: event.code, reason: event.reason });
    if (!closedByUser) scheduleReconnect();
  }

  function scheduleReconnect() {
    let delay;
    if (retryAfterMs !== null) {
      delay = retryAfterMs; // the server spread these over its drain window
      retryAfterMs = null;
    } else {
      delay = backoffDelay(attempt, opts, random);
    }
    attempt += 1;
    status = "reconnecting";
    emit("reconnecting", { attempt, delayMs: delay });
    reconnectTimer = setTimer(connect, delay);
  }

  function getPartialApplications() {
    return new Promise((resolve, reject) => {
      requestCounter += 1;
      const requestId = `req_${requestCounter}_${Math.floor(random() * 1e9).toString(36)}`;
      if (!send({ type: "get_partial_applications", requestId })) {
        reject(new Error("not connected"));
        return;
      }
      const timer = setTimer(() => {
        pending.delete(requestId);
        reject(new Error(`no reply within ${opts.requestTimeoutMs} ms`));
      }, opts.requestTimeoutMs);
      pending.set(requestId, { resolve, reject, timer });
    });
  }

  const client = {
    sendMessage(type, message, extra = {}) {
      return send({ ...extra, type, message });
    },
    getPartialApplications,
    updateSession(id) {
      sessionId = id;
      return send({ type: "update_session", sessionId: id });
    },
    updateUserInfo(id) {
      userId = id;
      return send({ type: "update_user_info", userId: id });
    },
    subscribe(entityType, entityId) {
      subscriptions.set(`${entityType}/${entityId}`, { entityType, entityId });
      return send({ type: "subscribe", entityType, entityId });
    },
    unsubscribe(entityType, entityId) {
      subscriptions.delete(`${entityType}/${entityId}`);
      return send({ type: "unsubscribe", entityType, entityId });
    },
    close() {
      closedByUser = true;
      status = "closed";
      if (reconnectTimer !== null) clearTimer(reconnectTimer);
      if (refreshTimer !== null) clearTimer(refreshTimer);
      reconnectTimer = refreshTimer = null;
      for (const [requestId, request] of pending) {
        clearTimer(request.timer);
        request.reject(new Error("client closed"));
        pending.delete(requestId);
      }
      if (socket) socket.close(1000, "client closed");
    },
    getStatus() {
      return {
        status,
        connected: status === "open",
        url: target,
        attempt,
        lastSeq: Number.isFinite(lastSeq) ? lastSeq : null,
        subscriptions: [...subscriptions.values()],
      };
    },
  };
  connect();
  return client;
}

export default createWebSocketClient;
