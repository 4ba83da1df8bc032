// Where the app finds chatnode. A node that serves this app (CHATNODE_WEB_DIR) answers
// /config.js itself, with its WebSocket port. Served by another web server, this file
// is used: the socket is wss:// (or ws://) on the page's own host, path /ws.
window.CHATNODE = window.CHATNODE || {};
