// Node's socket.io with @socket.io/redis-adapter: the peer an operator would
// most likely deploy instead of oddsgate.
//
// One process. A player joins one room per topic with the `subscribe` event
// (acknowledged). The aggregator publishes the way @socket.io/redis-emitter
// does (bench/emitters.py SocketIONodeEmitter: msgpack on
// `socket.io#/#<room>#`), and the adapter broadcasts to the local room.
//
//   node bench/peers/node/server.js --port 8300 --redis-url redis://127.0.0.1:6379/0
"use strict";

const { createServer } = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function arg(name) {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0 || i + 1 >= process.argv.length) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
  return process.argv[i + 1];
}

async function main() {
  const port = Number(arg("port"));
  const url = arg("redis-url");
  const pub = createClient({ url });
  const sub = pub.duplicate();
  pub.on("error", (err) => console.error("redis pub:", err.message));
  sub.on("error", (err) => console.error("redis sub:", err.message));
  await Promise.all([pub.connect(), sub.connect()]);

  const http = createServer((req, res) => {
    if (req.url === "/healthz") {
      res.writeHead(200, { "Content-Type": "text/plain" });
      res.end("ok\n");
    } else if (!req.url.startsWith("/socket.io/")) {
      res.writeHead(404);
      res.end();
    }
  });
  const io = new Server(http, {
    adapter: createAdapter(pub, sub),
    transports: ["websocket"],
    perMessageDeflate: false,
    serveClient: false,
  });
  io.on("connection", (socket) => {
    socket.on("subscribe", (topics, ack) => {
      socket.join(topics);
      if (typeof ack === "function") ack(topics);
    });
  });
  http.listen({ port, host: "127.0.0.1", backlog: 1024 });
  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
