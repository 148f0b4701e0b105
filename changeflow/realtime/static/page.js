// The gateway's page: sign in (demo user or pasted token), then show new_post and feed_update live.
// Every value from the server is put in the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let socket = null;
const seen = new Set(); // "event post_id event_id": a redelivered task may emit again

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// Relaxed Extended JSON: {"$oid": "..."}, {"$date": "..."} (or {"$date": {"$numberLong": ...}}).
function plain(value) {
  if (value && typeof value === "object") {
    if ("$oid" in value) return value.$oid;
    if ("$date" in value) {
      const d = value.$date;
      return new Date(typeof d === "object" ? Number(d.$numberLong) : d);
    }
  }
  return value;
}

function addItem(listId, event, payload) {
  const key = `${event} ${payload.post_id} ${payload.event_id}`;
  if (seen.has(key)) return;
  seen.add(key);
  const post = payload.post || {};
  const created = plain(post.created_at);
  const li = document.createElement("li");
  li.dataset.postId = payload.post_id;
  const meta = document.createElement("div");
  meta.className = "meta";
  const who = document.createElement("strong");
  who.textContent = payload.author_name || String(plain(post.author_id));
  const when = document.createElement("time");
  if (created instanceof Date && !isNaN(created)) {
    when.dateTime = created.toISOString();
    when.textContent = created.toLocaleString();
  }
  meta.append(who, when);
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = post.text == null ? "" : String(post.text);
  li.append(meta, text);
  $(listId).prepend(li);
}

function connect(token, user) {
  if (socket) socket.disconnect();
  showError("");
  setStatus("connecting", "connecting…");
  socket = io({ auth: { token } });
  socket.on("connect", () => {
    setStatus("live", "live");
    $("signin").hidden = true;
    $("live").hidden = false;
    $("user-name").textContent = user.name || user.id || "token user";
    $("user-id").textContent = user.id || "";
  });
  socket.on("connect_error", (err) => {
    // Refused by the gateway (missing, forged or expired token): do not retry with the same token.
    if (!socket.active) {
      setStatus("refused", "refused");
      showError(`The gateway refused the connection: ${err.message}`);
      $("signin").hidden = false;
      $("live").hidden = true;
    } else {
      setStatus("offline", "reconnecting…");
    }
  });
  socket.on("disconnect", () => setStatus("offline", "reconnecting…"));
  socket.on("new_post", (payload) => addItem("new-posts", "new_post", payload));
  socket.on("feed_update", (payload) => addItem("feed", "feed_update", payload));
}

async function demoSignIn(user) {
  showError("");
  const response = await fetch("/demo/login", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user_id: user.id }),
  });
  const answer = await response.json();
  if (!response.ok) return showError(answer.error || `sign-in failed (${response.status})`);
  connect(answer.token, { id: answer.user_id, name: user.name });
}

async function loadDemoUsers() {
  let response;
  try {
    response = await fetch("/demo/users");
  } catch {
    return;
  }
  if (response.status === 404) return; // demo sign-in off: tokens only
  $("demo").hidden = false;
  const answer = await response.json();
  const box = $("demo-users");
  for (const user of answer.users || []) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.userId = user.id;
    button.textContent = user.name;
    const id = document.createElement("small");
    id.textContent = `…${user.id.slice(-6)}`;
    button.append(id);
    button.addEventListener("click", () => demoSignIn(user));
    box.append(button);
  }
  if (!response.ok) showError(answer.error || "cannot list the demo users");
}

$("demo-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = $("demo-user-id").value.trim();
  if (id) demoSignIn({ id, name: id });
});
// The user id a token names (its first part is base64url JSON {"sub": id}); the gateway checks it.
function tokenUser(token) {
  try {
    const part = token.split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
    return String(JSON.parse(atob(part)).sub || "");
  } catch {
    return "";
  }
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  const id = tokenUser(token);
  if (token) connect(token, { id, name: id ? "token user" : "" });
});
$("signout").addEventListener("click", () => {
  if (socket) socket.disconnect();
  socket = null;
  seen.clear();
  $("new-posts").replaceChildren();
  $("feed").replaceChildren();
  $("live").hidden = true;
  $("signin").hidden = false;
  setStatus("signed-out", "signed out");
});
loadDemoUsers();
