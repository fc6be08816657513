// A Portico booking tab on the official socket.io-client, for tests/test_socketio.py.
// argv: url path transports(comma-separated) cookie [origin]
// stdout: one JSON line per event: {"event": "message", "data": {...}} and connect/disconnect/
// upgrade/connect_error. stdin: JSON lines {"send": {...}}, {"drop": true} (the transport is
// cut: the client reconnects by itself), {"close": true}.
import { io } from "socket.io-client";
import readline from "node:readline";

const [url, path, transports, cookie, origin] = process.argv.slice(2);
const extraHeaders = {};
if (cookie) extraHeaders.Cookie = cookie;
if (origin) extraHeaders.Origin = origin;
const out = (event, data) => process.stdout.write(JSON.stringify({ event, data }) + "\n");

const socket = io(url, {
  path,
  transports: transports.split(","),
  // The frontend sets withCredentials: true (a browser then sends the session cookie). Under
  // Node that option switches on the client's own cookie jar, which replaces the Cookie header
  // below on the WebSocket handshake; the cookie is passed explicitly instead.
  extraHeaders,
  reconnectionDelay: 100,
  reconnectionDelayMax: 500,
});
socket.on("connect", () => out("connect", { transport: socket.io.engine.transport.name }));
socket.on("disconnect", (reason) => out("disconnect", reason));
socket.on("connect_error", (err) => out("connect_error", String(err && err.message)));
socket.on("message", (data, offset) => out("message", { ...data, _offset: offset ?? null }));
socket.io.on("open", () => socket.io.engine.on("upgrade", (t) => out("upgrade", t.name)));

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.send) socket.emit("message", command.send);
  if (command.drop) socket.io.engine.close();
  if (command.close) { socket.close(); process.exit(0); }
});
