// Example backend in Node: the basic behaviour of server.py (stdlib `http` only).
//
// Environment: PORT (default 3000), HOST (default 127.0.0.1), PM2_INSTANCE_ID (or INSTANCE).
// Every response carries `X-Backend: <port>` and `X-Instance: <id>`.
//   GET /health   200 "ok"
//   anything else 200 "instance <id> port <port>" (a request body is read and discarded)
"use strict";
const http = require("http");

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || "127.0.0.1";
const instance = process.env.PM2_INSTANCE_ID || process.env.INSTANCE || "0";

const server = http.createServer((req, res) => {
  req.resume(); // consume any body so the keep-alive connection can carry the next request
  req.on("end", () => {
    const body = req.url === "/health" ? "ok\n" : `instance ${instance} port ${port}\n`;
    res.writeHead(200, {
      "Content-Type": "text/plain",
      "Content-Length": Buffer.byteLength(body),
      "X-Backend": String(port),
      "X-Instance": instance,
    });
    res.end(body);
  });
});

server.listen(port, host, () => console.log(`instance ${instance} listening on ${host}:${port}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
