// The demo page: shows the cart through the Portico Push client, changes it through the
// tiny backend (which writes PostgreSQL and publishes the trigger, like PHP does).
import { createWebSocketClient } from "/static/client.js";

const $ = (selector) => document.querySelector(selector);
const money = new Intl.NumberFormat("nb-NO", { style: "currency", currency: "NOK" });
const when = new Intl.DateTimeFormat("nb-NO", { dateStyle: "medium", timeStyle: "short", timeZone: "Europe/Oslo" });

function gatewayUrl(spec) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  if (spec.startsWith(":")) return `${scheme}//${location.hostname}${spec}/wss`; // same host, that port
  if (spec.startsWith("/")) return `${scheme}//${location.host}${spec}`; // same origin (reverse proxy)
  return spec;
}

function setStatus(state, text) {
  $("#status").dataset.state = state;
  $("#status-text").textContent = text;
}

let shownIds = new Set();

function renderCart(data) {
  if (data.error) {
    $("#cart-error").hidden = false;
    $("#cart-error").textContent = data.message || "Could not load your cart";
    return; // keep showing the last good cart: an error is not an empty cart
  }
  $("#cart-error").hidden = true;
  const items = $("#items");
  items.replaceChildren();
  let total = 0;
  const ids = new Set();
  for (const app of data.applications) {
    const sum = (app.orders || []).reduce((acc, order) => acc + order.sum, 0);
    total += sum;
    ids.add(app.id);
    const li = document.createElement("li");
    li.dataset.id = app.id;
    if (!shownIds.has(app.id)) li.classList.add("fresh");
    const date = app.dates?.[0] ? when.format(new Date(app.dates[0].from_)) : "";
    const resource = app.resources?.[0]?.name || "";
    li.innerHTML = `<div><div class="name"></div><div class="when"></div></div><div><span class="sum"></span> <button class="remove" type="button">Remove</button></div>`;
    li.querySelector(".name").textContent = app.name;
    li.querySelector(".when").textContent = [resource, date].filter(Boolean).join(" · ");
    li.querySelector(".sum").textContent = money.format(sum);
    li.querySelector(".remove").addEventListener("click", () => fetch(`/api/applications/${app.id}`, { method: "DELETE" }));
    items.append(li);
  }
  shownIds = ids;
  $("#count").textContent = String(data.count);
  $("#total").textContent = money.format(total);
  document.body.dataset.seq = String(data.seq);
}

function toast(text) {
  const div = document.createElement("div");
  div.className = "toast";
  div.textContent = text;
  $("#toasts").append(div);
  setTimeout(() => div.remove(), 8000);
}

// Today's Portico frontend speaks Socket.IO (socket.io-client, path /wss/socket.io, the event
// "message" carrying the same JSON objects): `?transport=socketio` shows the page through it,
// with the official client bundle the gateway serves, beside the raw WebSocket client.
async function connectSocketIO(spec) {
  const base = spec.startsWith(":") ? `${location.protocol}//${location.hostname}${spec}` : spec.startsWith("/") ? location.origin : spec;
  await new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = `${base}/wss/socket.io/socket.io.js`;
    script.onload = resolve;
    script.onerror = () => reject(new Error("the gateway serves no socket.io-client bundle"));
    document.head.append(script);
  });
  const socket = window.io(base, { path: "/wss/socket.io", transports: ["polling", "websocket"], withCredentials: true });
  const emit = (name, detail) => window.dispatchEvent(new CustomEvent(`portico:${name}`, { detail }));
  socket.on("connect", () => emit("connected", { url: base, transport: "socketio" }));
  socket.on("disconnect", (reason) => emit("reconnecting", { attempt: 1, reason }));
  socket.on("message", (message) => {
    emit("message", message);
    if (message.type === "partial_applications_response") {
      emit("partial_applications", { ...message.data, isServerPush: message.data.source === "server_push" });
    } else if (["server_message", "room_message", "notification", "entity_event"].includes(message.type)) {
      emit(message.type, message);
    }
  });
  const send = (message) => socket.emit("message", message);
  return {
    socket,
    subscribe: (entityType, entityId) => send({ type: "subscribe", entityType, entityId }),
    unsubscribe: (entityType, entityId) => send({ type: "unsubscribe", entityType, entityId }),
  };
}

const config = await (await fetch("/api/config")).json();
const params = new URLSearchParams(location.search);
const chosen = Math.min(Math.max(Number(params.get("gateway") || 1), 1), config.gateways.length);
const transport = params.get("transport") === "socketio" ? "socketio" : "websocket";
config.gateways.forEach((spec, i) => {
  for (const [kind, label] of [["websocket", ""], ["socketio", " (Socket.IO)"]]) {
    const a = document.createElement("a");
    a.href = kind === "socketio" ? `?gateway=${i + 1}&transport=socketio` : `?gateway=${i + 1}`;
    a.textContent = `Gateway ${i + 1}${label}`;
    if (i + 1 === chosen && kind === transport) a.className = "current";
    $("#gateways").append(a);
  }
});
document.body.dataset.transport = transport;

window.addEventListener("portico:connected", () =>
  setStatus("open", `Live · gateway ${chosen}${transport === "socketio" ? " · Socket.IO" : ""}`));
window.addEventListener("portico:reconnecting", (e) => setStatus("connecting", `Reconnecting (try ${e.detail.attempt})…`));
window.addEventListener("portico:disconnected", () => setStatus("closed", "Disconnected"));
window.addEventListener("portico:partial_applications", (e) => renderCart(e.detail));
window.addEventListener("portico:server_message", (e) => {
  for (const m of e.detail.messages || []) toast(m.title ? `${m.title}: ${m.text}` : m.text);
});
window.addEventListener("portico:message", (e) => {
  if (e.detail.type === "subscription_confirmation") document.body.dataset.watching = e.detail.status;
});
window.addEventListener("portico:room_message", (e) => {
  const li = document.createElement("li");
  li.textContent = `${e.detail.roomId}: ${e.detail.message}`;
  $("#room-log").append(li);
});

const client =
  transport === "socketio"
    ? await connectSocketIO(config.gateways[chosen - 1])
    : createWebSocketClient(gatewayUrl(config.gateways[chosen - 1]));
window.porticoClient = client;

$("#add").addEventListener("click", () => fetch("/api/applications", { method: "POST" }));
$("#toast-me").addEventListener("click", () => fetch("/api/toast", { method: "POST" }));
$("#post-room").addEventListener("click", () => fetch("/api/room-message", { method: "POST" }));
$("#watch").addEventListener("change", (e) => {
  const { entityType, entityId } = config.room;
  if (e.target.checked) client.subscribe(entityType, entityId);
  else client.unsubscribe(entityType, entityId);
});
