// The relay people reach for first: Socket.IO on Node with the Redis adapter.
// A client joins the room named after its user; a "send" goes to the recipient's room
// (through Redis to whichever instance holds it). Nothing is stored; nothing is acked.
const { createServer } = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const port = parseInt(process.argv[2], 10);
const redisUrl = process.argv[3] || "redis://127.0.0.1:6379";

(async () => {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const http = createServer();
  const io = new Server(http, { adapter: createAdapter(pub, sub), transports: ["websocket"] });
  io.on("connection", (socket) => {
    const me = socket.handshake.auth.user;
    socket.join(me);
    socket.on("send", (msg) => {
      io.to(msg.to).emit("message", { id: msg.id, from: me, body: msg.body, ts: Date.now() });
    });
  });
  http.listen(port, "127.0.0.1", () => console.log(`relay on ${port}`));
})();
