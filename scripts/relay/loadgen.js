// One load generator for both: chatnode (its protocol, every entry acked) and the
// Socket.IO relay (emit "send", receive "message"). Reads a JSON spec on stdin, prints
// JSON figures on stdout. Pairs send to each other at the paced rate.
const WebSocket = require("ws");
const { io } = require("socket.io-client");

const clock = () => performance.timeOrigin + performance.now(); // epoch ms, sub-ms

function pct(values, q) {
  if (!values.length) return null;
  values.sort((a, b) => a - b);
  const k = Math.min(values.length - 1, Math.max(0, Math.round((q / 100) * (values.length - 1))));
  return Math.round(values[k] * 100) / 100;
}

async function main() {
  let input = "";
  for await (const chunk of process.stdin) input += chunk;
  const spec = JSON.parse(input);
  const stats = { sent: 0, accepted: new Set(), received: new Set(), dup: 0, lat: [], errors: {} };
  const peers = [];
  const pad = "x".repeat(Math.max(0, spec.bodyBytes - 20));

  for (const u of spec.users) {
    const peer = { u, sentAt: new Map() };
    if (spec.target === "chatnode") {
      await new Promise((resolve, reject) => {
        const ws = new WebSocket(`${u.ws}?token=${u.token}`, { perMessageDeflate: false });
        peer.ws = ws;
        ws.on("error", reject);
        ws.on("message", (data) => {
          const f = JSON.parse(data);
          if (f.type === "hello") resolve();
          else if (f.type === "accepted") stats.accepted.add(u.mobile + "/" + f.id);
          else if (f.type === "message") {
            const key = f.from + "/" + f.id;
            if (stats.received.has(key)) stats.dup++;
            else {
              stats.received.add(key);
              stats.lat.push(clock() - parseFloat(f.body));
            }
            ws.send(JSON.stringify({ type: "ack", msgIds: [f.msgId] }));
          } else if (f.type === "receipt") {
            ws.send(JSON.stringify({ type: "ack", msgIds: [f.msgId] }));
          } else if (f.type === "error") {
            stats.errors[f.code] = (stats.errors[f.code] || 0) + 1;
          }
        });
      });
      peer.send = (id, body) =>
        peer.ws.send(JSON.stringify({ type: "send", id, to: u.target, body }));
    } else {
      await new Promise((resolve, reject) => {
        const s = io(u.ws, { transports: ["websocket"], auth: { user: u.mobile } });
        peer.s = s;
        s.on("connect", resolve);
        s.on("connect_error", reject);
        s.on("message", (f) => {
          const key = f.from + "/" + f.id;
          if (stats.received.has(key)) stats.dup++;
          else {
            stats.received.add(key);
            stats.lat.push(clock() - parseFloat(f.body));
          }
        });
      });
      peer.send = (id, body) => {
        stats.accepted.add(u.mobile + "/" + id); // the relay has no accepted: sent is all
        peer.s.emit("send", { id, to: u.target, body });
      };
    }
    peers.push(peer);
  }

  await new Promise((r) => setTimeout(r, 500));
  const cpu0 = process.cpuUsage();
  const start = performance.now();
  const run = Math.random().toString(36).slice(2, 8);
  await new Promise((resolve) => {
    const timer = setInterval(() => {
      const elapsed = (performance.now() - start) / 1000;
      if (elapsed >= spec.duration) {
        clearInterval(timer);
        resolve();
        return;
      }
      const due = Math.floor(spec.rate * elapsed) - stats.sent;
      for (let i = 0; i < due; i++) {
        const peer = peers[stats.sent % peers.length];
        stats.sent++;
        peer.send(`${run}-${stats.sent}`, `${clock().toFixed(3)} ${pad}`);
      }
    }, 5);
  });
  const seconds = (performance.now() - start) / 1000;
  const drainUntil = Date.now() + spec.drain * 1000;
  // received keys are from/id of the sender; accepted are sender/id: same shape
  while (Date.now() < drainUntil) {
    let missing = 0;
    for (const k of stats.accepted) if (!stats.received.has(k)) missing++;
    if (missing === 0) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  const cpu = process.cpuUsage(cpu0);
  let lost = 0;
  for (const k of stats.accepted) if (!stats.received.has(k)) lost++;
  const out = {
    sent: stats.sent,
    accepted: stats.accepted.size,
    received: stats.received.size,
    lost,
    dup: stats.dup,
    errors: stats.errors,
    seconds,
    cpu_s: (cpu.user + cpu.system) / 1e6,
    lat: stats.lat,
  };
  for (const p of peers) {
    if (p.ws) p.ws.close();
    if (p.s) p.s.close();
  }
  process.stdout.write(JSON.stringify(out), () => process.exit(0));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
