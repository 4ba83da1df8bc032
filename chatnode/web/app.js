// chatnode's web app: no build step, no dependencies. Each browser tab is a device of
// its user (PROTOCOL v2): it logs in with a device name of its own, kept in the tab's
// sessionStorage. History and the outbox live in IndexedDB, in this browser only; the
// server keeps a message only until every device of its recipient has acked it.
"use strict";

const CFG = window.CHATNODE || {};
const RETRIED = new Set(["unavailable", "rate_limited", "inbox_full"]);
const RANK = { failed: 0, sending: 1, accepted: 2, delivered: 3, read: 4, received: 1 };
const TICKS = { sending: "🕓", accepted: "✓", delivered: "✓✓", read: "✓✓", failed: "⚠" };
const MAX_SHOWN = 500; // messages drawn per conversation (the newest)
const MAX_CONTACTS = 200;

const $ = (id) => document.getElementById(id);
const state = {
  token: null, mobile: null, deviceId: null, db: null, ws: null, live: false,
  typing: new Map(), attempt: 0, urlIndex: 0, apiIndex: 0, timer: null, frames: Promise.resolve(), outgoing: Promise.resolve(), retry: null, reading: Promise.resolve(), peer: null, blocked: new Set(), typingUntil: 0,
  typingSent: 0, typingStop: null, seq: 0, stopped: false, peerSeen: "",
};

// -- storage (IndexedDB: one database per user on this browser) -------------------------

function openDb(mobile) {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open("chatnode-" + mobile, 1);
    req.onupgradeneeded = () => {
      const db = req.result;
      const msgs = db.createObjectStore("messages", { keyPath: "key" });
      msgs.createIndex("peer", "peer");
      msgs.createIndex("status", "status");
      msgs.createIndex("id", "id");
      db.createObjectStore("contacts", { keyPath: "mobile" });
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function tx(store, mode, fn) {
  return new Promise((resolve, reject) => {
    const t = state.db.transaction(store, mode);
    let out;
    Promise.resolve(fn(t.objectStore(store))).then((v) => { out = v; });
    t.oncomplete = () => resolve(out);
    t.onerror = () => reject(t.error);
    t.onabort = () => reject(t.error || new Error("IndexedDB transaction aborted"));
  });
}

const req = (r) => new Promise((resolve, reject) => {
  r.onsuccess = () => resolve(r.result);
  r.onerror = () => reject(r.error);
});

// Put a message, merged with what is stored under its key: never a lower status, never
// a second copy (the same entry reaches every device, and tabs share this database).
function saveMessage(m) {
  return tx("messages", "readwrite", async (s) => {
    const old = await req(s.get(m.key));
    const merged = old ? { ...old, ...m } : m;
    // a tick never moves back; only a send still waiting can fail
    const keep = m.status === "failed" ? old && old.status !== "sending" : RANK[old?.status] > RANK[m.status];
    if (old && keep) merged.status = old.status;
    if (old) merged.seq = old.seq;
    s.put(merged);
    return { merged, isNew: !old };
  });
}

const messagesOf = (peer) => tx("messages", "readonly", (s) => req(s.index("peer").getAll(peer)));
const outbox = () => tx("messages", "readonly", (s) => req(s.index("status").getAll("sending")));
const contacts = () => tx("contacts", "readonly", (s) => req(s.getAll()));

function saveContact(c) {
  return tx("contacts", "readwrite", async (s) => {
    const old = await req(s.get(c.mobile));
    s.put({ unread: 0, name: "", lastSeen: "", ...old, ...c });
  });
}

const nextSeq = () => Date.now() * 1000 + (state.seq++ % 1000);
const newId = () => {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return btoa(String.fromCharCode(...b)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
};

// -- REST ---------------------------------------------------------------------------

const API_TIMEOUT_MS = 10000;

// The page's own API first, then the other nodes' (CHATNODE_WEB_APIS, which let this
// page call them: CHATNODE_CORS_ORIGINS). A request that cannot reach one (refused, no
// network) goes to the next, and the one that answered is tried first next time. A GET
// that timed out goes to the next too; a POST or DELETE that timed out does not (that
// node may be slow, not gone, and may still carry it out).
function apiBases() {
  const own = CFG.api || "";
  return [own, ...(CFG.apis || []).filter((u) => u !== own && u !== location.origin)];
}

function timeoutSignal(ms) { // AbortSignal.timeout where the browser lacks it
  if (AbortSignal.timeout) return AbortSignal.timeout(ms);
  const c = new AbortController();
  setTimeout(() => c.abort(), ms);
  return c.signal;
}

const offline = () => Object.assign(new Error("cannot reach the server"), { code: "offline" });

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const bases = apiBases();
  let resp, data;
  for (let i = 0; i < bases.length && !resp; i++) {
    const at = (state.apiIndex + i) % bases.length;
    const signal = timeoutSignal(API_TIMEOUT_MS);
    try {
      resp = await fetch(bases[at] + path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal,
      });
      state.apiIndex = at;
    } catch (e) { // that node is away: the next, unless a write may have gone through
      if (signal.aborted && method !== "GET") throw offline();
      continue;
    }
    data = await resp.json().catch(() => null); // every answer is the JSON envelope
  }
  if (!resp || data === null) throw offline();
  if (!resp.ok) { // {"success": false, "error": {"code", "message"}}
    const err = data.error || {};
    if (resp.status === 401 && state.token && path !== "/auth/login") loggedOut("please log in again");
    throw Object.assign(new Error(err.message || `HTTP ${resp.status}`), { code: err.code, status: resp.status });
  }
  return data;
}

// -- the socket -----------------------------------------------------------------------

// The node that served the page first, then the others it names (CHATNODE_WEB_SOCKETS):
// each attempt after a failure or a lost socket takes the next.
function wsUrls() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const host = CFG.wsPort ? `${location.hostname}:${CFG.wsPort}` : location.host;
  const own = CFG.ws || `${scheme}//${host}/ws`;
  return [own, ...(CFG.sockets || []).filter((u) => u !== own)];
}

function setConn(text) {
  const el = $("conn");
  el.textContent = text;
  el.dataset.state = text;
  document.body.dataset.conn = text; // the bar over a conversation says it too
  $("offline-bar").textContent = text === "online" ? "" :
    `${text}: messages wait on this device and go when the connection is back`;
}

function connect() {
  clearTimeout(state.timer);
  if (state.stopped || !state.token) return;
  if (!navigator.onLine) { setConn("offline"); return; }
  setConn("connecting");
  const urls = wsUrls();
  const url = urls[state.urlIndex % urls.length];
  const ws = new WebSocket(url + "?token=" + encodeURIComponent(state.token));
  state.ws = ws;
  let hello = false;
  ws.onmessage = (e) => {
    if (state.ws !== ws) return;
    const f = JSON.parse(e.data);
    if (f.type === "hello") hello = true;
    // one frame after the other: an error for a resend must not pass its accepted
    state.frames = state.frames.then(() => onFrame(f)).catch(console.error);
  };
  ws.onclose = (e) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.live = false;
    // a handshake refused (401: the device removed, the token expired) looks like
    // 1006 here: REST tells, and a 401 there logs out
    if (!hello) api("GET", "/devices").catch(() => {});
    if (e.code === 4003) return loggedOut("logged out (this device was removed or the token expired)");
    if (e.code === 4001) return setConn("open in another window");
    if (state.stopped) return;
    state.urlIndex++; // that node may be gone: the next one
    setConn(navigator.onLine ? "reconnecting" : "offline");
    // full jitter: a uniform wait up to min(15 s, 0.5 s × 2^attempt)
    const wait = Math.random() * Math.min(15000, 500 * 2 ** Math.min(state.attempt++, 10));
    state.timer = setTimeout(connect, wait);
  };
}

function sendFrame(frame) {
  if (!state.ws || !state.live || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

// Every send frame goes through this one queue, so a new message never overtakes older
// ones an outbox flush is still reading from IndexedDB (the server stores in the order
// a socket delivers).
function outgoing(step) {
  state.outgoing = state.outgoing.then(step).catch(console.error);
  return state.outgoing;
}

// Sends not accepted yet, oldest first, with their ids (stored once however often they
// go). `olderThan`: only those written that long ago (the periodic retry).
function flushOutbox(olderThan = 0) {
  return outgoing(async () => {
    const waiting = (await outbox()).sort((a, b) => a.seq - b.seq);
    const now = Date.now();
    for (const m of waiting) {
      if ((m.retryAt && m.retryAt > now) || now - m.ts < olderThan) continue;
      sendFrame({ type: "send", id: m.id, to: m.peer, body: m.body });
    }
  });
}

async function onFrame(f) {
  switch (f.type) {
    case "hello":
      if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return; // a stale hello
      state.live = true;
      state.attempt = 0;
      setConn("online");
      await flushOutbox(); // resent with their ids: stored once
      if (state.peer) sendReads(state.peer);
      refreshContacts();
      break;
    case "accepted": {
      const m = await findMine(f.id);
      if (m) await saveMessage({ ...m, status: "accepted", msgId: f.msgId, ts: f.ts });
      break;
    }
    case "error": {
      const m = f.ref ? await findMine(f.ref) : null;
      if (m && m.status === "sending") {
        if (RETRIED.has(f.code)) {
          await saveMessage({ ...m, retryAt: Date.now() + 2000 });
          if (!state.retry) { // one timer for every refused send
            state.retry = setTimeout(() => { state.retry = null; flushOutbox(); }, 2100);
          }
        } else {
          await saveMessage({ ...m, status: "failed", error: f.message });
        }
      } else {
        toast(f.message || f.code);
      }
      break;
    }
    case "message":
      await onMessage(f);
      sendFrame({ type: "ack", msgIds: [f.msgId] }); // stored: ack it
      break;
    case "receipt":
      await onReceipt(f);
      sendFrame({ type: "ack", msgIds: [f.msgId] });
      break;
    case "typing": // shown for 6 s at most: a lost "stop" does not stick
      if (f.state === "start") state.typing.set(f.from, Date.now() + 6000);
      else state.typing.delete(f.from);
      if (state.typing.size > MAX_CONTACTS) state.typing.delete(state.typing.keys().next().value);
      if (f.from === state.peer) state.typingUntil = state.typing.get(f.from) || 0;
      showPeerStatus();
      if (f.state === "start") setTimeout(() => { showPeerStatus(); render(); }, 6100);
      break;
  }
  await render();
}

async function findMine(id) {
  const all = await tx("messages", "readonly", (s) => req(s.index("id").getAll(id)));
  return all.find((m) => m.mine) || null;
}

async function onMessage(f) {
  const mine = typeof f.to === "string"; // v2: my own send, from another device
  const peer = mine ? f.to : f.from;
  const m = {
    key: `${peer}|${mine ? "o" : "i"}|${f.id}`, peer, mine, id: f.id, body: f.body,
    ts: f.ts, msgId: f.msgId, status: mine ? "accepted" : "received", seq: nextSeq(),
  };
  const { isNew, merged } = await saveMessage(m);
  await saveContact({ mobile: peer });
  if (isNew && !mine && merged.status === "received" && !(peer === state.peer && visible())) {
    await bumpUnread(peer, 1);
  }
  if (peer === state.peer) {
    await render(); // drawn, then read
    sendReads(peer);
  }
}

async function onReceipt(f) {
  if (typeof f.from === "string") { // v2: I read these on another device
    for (const id of f.ids) {
      const key = `${f.from}|i|${id}`;
      const old = await tx("messages", "readonly", (s) => req(s.get(key)));
      if (old) await saveMessage({ ...old, status: "read" });
    }
    await saveContact({ mobile: f.from, unread: 0 });
    return;
  }
  for (const id of f.ids) {
    const key = `${f.by}|o|${id}`;
    const old = await tx("messages", "readonly", (s) => req(s.get(key)));
    if (old) await saveMessage({ ...old, status: f.status });
  }
}

// Read receipts for what the open conversation shows, while the page is visible.
// One at a time (each id is named once), and only for messages drawn on the screen.
function sendReads(peer) {
  state.reading = state.reading.then(() => readsNow(peer)).catch(console.error);
  return state.reading;
}

async function readsNow(peer) {
  if (!visible() || !state.live || peer !== state.peer) return;
  const drawn = new Set([...$("messages").querySelectorAll("li.theirs")].map((li) => li.dataset.id));
  const unread = (await messagesOf(peer)).filter((m) => !m.mine && m.status === "received" && drawn.has(m.id));
  for (let i = 0; i < unread.length; i += 100) {
    const part = unread.slice(i, i + 100);
    if (!sendFrame({ type: "read", to: peer, ids: part.map((m) => m.id) })) return;
    for (const m of part) await saveMessage({ ...m, status: "read" });
  }
  const left = (await messagesOf(peer)).filter((m) => !m.mine && m.status === "received").length;
  await saveContact({ mobile: peer, unread: left });
}

const visible = () => document.visibilityState === "visible";

async function bumpUnread(peer, n) {
  const c = (await contacts()).find((x) => x.mobile === peer);
  await saveContact({ mobile: peer, unread: ((c && c.unread) || 0) + n });
}

// -- drawing --------------------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function when(ts) {
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

async function render() {
  const list = $("contacts");
  const cs = (await contacts()).sort((a, b) => a.mobile.localeCompare(b.mobile)).slice(0, MAX_CONTACTS);
  list.replaceChildren(...cs.map((c) => {
    const li = el("li", c.mobile === state.peer ? "contact open" : "contact");
    li.dataset.mobile = c.mobile;
    li.append(el("span", "name", c.name ? `${c.name} (${c.mobile})` : c.mobile));
    const typing = (state.typing.get(c.mobile) || 0) > Date.now();
    li.append(el("small", "seen", typing ? "typing…" : seenText(c.lastSeen, true)));
    if (c.unread) li.append(el("span", "badge", String(c.unread)));
    li.onclick = () => openConversation(c.mobile);
    return li;
  }));
  if (!state.peer) return;
  const msgs = (await messagesOf(state.peer)).sort((a, b) => (a.ts - b.ts) || (a.seq - b.seq));
  const ol = $("messages");
  const atBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 40;
  ol.replaceChildren(...msgs.slice(-MAX_SHOWN).map((m) => {
    const li = el("li", m.mine ? "msg mine" : "msg theirs");
    li.dataset.id = m.id;
    li.dataset.status = m.status;
    li.append(el("span", "body", m.body));
    const meta = el("span", "meta", when(m.ts));
    if (m.mine) {
      const tick = el("span", "tick " + m.status, TICKS[m.status] || "");
      tick.title = m.error || m.status;
      meta.append(tick);
    }
    li.append(meta);
    return li;
  }));
  if (atBottom) ol.scrollTop = ol.scrollHeight;
  $("block").textContent = state.blocked.has(state.peer) ? "Unblock" : "Block";
}

// "online", "last seen …" (today: the time only when `short`), or "" (never seen, or
// they blocked you).
function seenText(lastSeen, short) {
  if (lastSeen === "online") return "online";
  if (!lastSeen) return "";
  const d = new Date(lastSeen);
  const today = d.toDateString() === new Date().toDateString();
  return "last seen " + (short && today ? when(d.getTime()) : d.toLocaleString());
}

function showPeerStatus() {
  const s = $("peer-status");
  s.textContent = Date.now() < state.typingUntil ? "typing…" : seenText(state.peerSeen, false);
}

// A user's name and last seen, kept as a contact under the number the server answers
// with; 404 for a number with no account.
async function lookUp(mobile) {
  const d = (await api("GET", "/profile/lastseen?mobileNo=" + encodeURIComponent(mobile))).data;
  await saveContact({ mobile: d.mobileNo, name: d.username, lastSeen: d.lastSeen || "" });
  return d;
}

// Last seen of every contact now and then (at most MAX_REFRESHED a round: each is a
// look-up, and look-ups are limited per user).
const MAX_REFRESHED = 30;
async function refreshContacts() {
  if (!state.token || !state.live) return;
  const cs = (await contacts()).slice(0, MAX_REFRESHED);
  for (const c of cs) {
    try {
      await lookUp(c.mobile);
    } catch (e) { return; } // offline, or limited: the next round
  }
  await render();
}

let toastTimer = null;
function toast(text) {
  const e = $("contact-error");
  e.textContent = text;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { e.textContent = ""; }, 5000);
}

// -- actions ----------------------------------------------------------------------------

async function openConversation(peer) {
  state.peer = peer;
  state.typingUntil = state.typing.get(peer) || 0;
  state.peerSeen = "";
  $("conversation").hidden = false;
  document.body.classList.add("in-conversation");
  $("peer-name").textContent = peer;
  showPeerStatus();
  await render();
  const ol = $("messages");
  ol.scrollTop = ol.scrollHeight;
  sendReads(peer);
  refreshPeer();
}

async function refreshPeer() {
  const peer = state.peer;
  if (!peer || !state.token) return;
  try {
    const d = await lookUp(peer);
    if (peer === state.peer) {
      $("peer-name").textContent = `${d.username} (${peer})`;
      state.peerSeen = d.lastSeen || "";
      showPeerStatus();
    }
  } catch (e) { /* offline: try again on the next tick */ }
}

async function send(body) {
  const peer = state.peer;
  const m = {
    key: `${peer}|o|${newId()}`, peer, mine: true, body, ts: Date.now(), status: "sending", seq: nextSeq(),
  };
  m.id = m.key.split("|")[2];
  await saveMessage(m); // in the outbox first: resent after a reconnect, same id
  outgoing(() => sendFrame({ type: "send", id: m.id, to: peer, body }));
  stopTyping();
  await render();
  $("messages").scrollTop = $("messages").scrollHeight;
}

function typed() {
  if (!state.peer) return;
  const now = Date.now();
  if (now - state.typingSent > 3000) {
    state.typingSent = now;
    sendFrame({ type: "typing", to: state.peer, state: "start" });
  }
  clearTimeout(state.typingStop);
  state.typingStop = setTimeout(stopTyping, 4000);
}

function stopTyping() {
  clearTimeout(state.typingStop);
  if (state.typingSent && state.peer) sendFrame({ type: "typing", to: state.peer, state: "stop" });
  state.typingSent = 0;
}

async function toggleBlock() {
  const peer = state.peer;
  try {
    if (state.blocked.has(peer)) {
      await api("DELETE", "/block-action/unblock?mobileNo=" + encodeURIComponent(peer));
      state.blocked.delete(peer);
    } else {
      await api("POST", "/block-action/block", { blockedUserMobileNo: peer });
      state.blocked.add(peer);
    }
  } catch (e) { toast(e.message); }
  await render();
}

async function loadBlocks() {
  try {
    const d = await api("GET", "/block-action/list");
    state.blocked = new Set(d.data.map((x) => x.mobileNo));
  } catch (e) { /* offline: the last known list stays */ }
}

// Each open tab is a device. Names come from a pool kept per user in this browser: a
// tab takes the first name no other open tab holds (a Web Lock, released when the tab
// closes), so a browser uses as many devices as it has tabs open at once, not one per
// tab ever opened.
async function deviceName(mobile) {
  const key = "chatnode.devices." + mobile;
  const pool = JSON.parse(localStorage.getItem(key) || "[]");
  const mine = sessionStorage.getItem("chatnode.device");
  if (mine && state.lock) return mine; // this tab holds its name already
  if (!navigator.locks) return keep(mine || "Browser tab " + newId().slice(0, 6)); // a name per tab
  const names = mine ? [mine, ...pool.filter((n) => n !== mine)] : pool;
  for (const name of names) {
    if (await holdName(mobile, name)) return keep(name);
  }
  const name = "Browser tab " + newId().slice(0, 6);
  localStorage.setItem(key, JSON.stringify([...pool, name]));
  await holdName(mobile, name);
  return keep(name);
}

function keep(name) {
  sessionStorage.setItem("chatnode.device", name);
  return name;
}

function holdName(mobile, name) {
  if (!navigator.locks) return Promise.resolve(true); // no Web Locks: a name per tab
  return new Promise((resolve) => {
    navigator.locks.request(`chatnode.device.${mobile}.${name}`, { ifAvailable: true }, (lock) => {
      if (!lock) { resolve(false); return undefined; }
      resolve(true);
      return new Promise((release) => { state.lock = release; }); // held while the tab lives
    });
  });
}

async function login(signup) {
  const mobile = $("mobile").value.trim();
  const password = $("password").value;
  $("login-error").textContent = "";
  try {
    if (signup) {
      const name = $("name").value.trim() || mobile;
      await api("POST", "/auth/signup", { name, mobileNo: mobile, password });
    }
    const d = await api("POST", "/auth/login", { mobileNo: mobile, password, device: await deviceName(mobile) });
    const device = sessionStorage.getItem("chatnode.device");
    sessionStorage.setItem("chatnode.session", JSON.stringify({ token: d.token, mobile, deviceId: d.deviceId, device }));
    await start();
  } catch (e) {
    $("login-error").textContent = e.code === "too_many_devices"
      ? "Too many devices: close a tab or remove a device, then try again."
      : e.message;
  }
}

async function logout() {
  state.stopped = true;
  try {
    if (state.deviceId) await api("DELETE", "/devices/" + encodeURIComponent(state.deviceId));
    else await api("POST", "/auth/logout");
  } catch (e) { /* the token dies with the device, or expires */ }
  loggedOut("");
}

function loggedOut(why) {
  state.stopped = true;
  if (state.ws) state.ws.close(1000);
  state.ws = null;
  state.token = null;
  state.peer = null;
  state.live = false;
  if (state.lock) state.lock(); // this tab's device name is free for another tab
  state.lock = null;
  $("conversation").hidden = true;
  document.body.classList.remove("in-conversation");
  $("messages").replaceChildren();
  $("contacts").replaceChildren();
  sessionStorage.removeItem("chatnode.session");
  $("chat").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why;
}

async function start() {
  const saved = JSON.parse(sessionStorage.getItem("chatnode.session") || "null");
  if (!saved) {
    $("login").hidden = false;
    return;
  }
  Object.assign(state, { token: saved.token, mobile: saved.mobile, deviceId: saved.deviceId, stopped: false });
  state.db = await openDb(saved.mobile);
  // a reload takes its name back; a duplicated tab (sessionStorage copied) cannot, and
  // logs in as a device of its own instead of closing the original's socket
  if (!state.lock && saved.device && !(await holdName(saved.mobile, saved.device))) {
    sessionStorage.removeItem("chatnode.session");
    sessionStorage.removeItem("chatnode.device");
    $("login").hidden = false;
    return;
  }
  $("login").hidden = true;
  $("chat").hidden = false;
  $("me").textContent = saved.mobile;
  await loadBlocks();
  await render();
  connect();
}

// -- wiring -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").onsubmit = (e) => { e.preventDefault(); login(false); };
  $("signup-button").onclick = () => {
    if (!$("login-form").reportValidity()) return;
    login(true);
  };
  $("logout").onclick = logout;
  $("add-contact").onsubmit = async (e) => {
    e.preventDefault();
    const number = $("contact-number").value.trim();
    try {
      const d = await lookUp(number);
      $("contact-number").value = "";
      await openConversation(d.mobileNo);
    } catch (err) {
      toast(err.status === 404 ? "No user has that number" : err.message);
    }
  };
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("text").value;
    if (!text.trim() || !state.peer) return;
    $("text").value = "";
    send(text);
  };
  $("text").oninput = typed;
  $("block").onclick = toggleBlock;
  $("back").onclick = () => {
    state.peer = null;
    $("conversation").hidden = true;
    document.body.classList.remove("in-conversation");
    render();
  };
  // the network went away: close the socket now (a browser may keep it open for a
  // while), connect again when it is back
  window.addEventListener("offline", () => {
    setConn("offline");
    if (state.ws) { const ws = state.ws; state.ws = null; state.live = false; ws.close(); }
  });
  window.addEventListener("online", () => { state.attempt = 0; connect(); });
  document.addEventListener("visibilitychange", () => { if (state.peer) sendReads(state.peer); });
  setInterval(refreshPeer, 5000);
  setInterval(refreshContacts, 30000);
  setInterval(() => { if (state.live) flushOutbox(10000); }, 10000);
  start().catch((e) => { $("login-error").textContent = String(e); $("login").hidden = false; });
});
