// samtrain's dashboard login. The token travels in an Authorization header
// to POST /ui/login, never in a URL the server sees: from the form, or from
// the address's fragment ("/ui#token=<token>", which `samtrain local`
// prints; browsers send no fragment to servers or in Referer headers).
// After "#token=<token>" the fragment may go on with a page of the
// dashboard ("#token=<token>#/job/<id>"), opened once logged in.
"use strict";

async function logIn(token, route) {
  const r = await fetch("/ui/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Authorization": "Bearer " + token, "x-samtrain-ui": "1" },
  });
  if (!r.ok) {
    const text = await r.text().catch(() => r.statusText);
    document.getElementById("error").textContent = text.trim() || r.statusText;
    return;
  }
  // The token leaves the address bar and the history, then the dashboard
  // loads with the cookie the answer set.
  history.replaceState(null, "", "/ui" + route);
  location.reload();
}

const fragment = location.hash.slice(1);
if (fragment.startsWith("token=")) {
  const rest = fragment.slice("token=".length);
  const cut = rest.indexOf("#");
  const token = decodeURIComponent(cut < 0 ? rest : rest.slice(0, cut));
  const route = cut < 0 ? "" : rest.slice(cut);
  history.replaceState(null, "", "/ui" + route);
  logIn(token, route);
}

document.getElementById("login").addEventListener("submit", (e) => {
  e.preventDefault();
  logIn(document.getElementById("token").value.trim(), location.hash);
});
