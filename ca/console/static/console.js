// Tessera console: keep the page current as the server changes, without a reload.
// The page names what it shows in <body data-live="...">; an event from /events whose
// "changed" list meets it re-fetches the page's content (X-Console-Fragment: 1).
"use strict";

(function () {
  const shows = (document.body.dataset.live || "").split(/\s+/).filter(Boolean);
  const state = document.getElementById("live-state");
  let pending = false;
  let held = false; // a change arrived while someone was typing into a form

  function live(on, why) {
    state.classList.toggle("on", on);
    state.classList.toggle("off", !on);
    state.title = why || (on ? "live: updates as the server changes" : "");
  }

  // A form being filled in is not replaced under the typing hands; it is refreshed
  // when they leave it unchanged (or on the answer to the form they send).
  function editing() {
    for (const field of document.querySelectorAll("#content input, #content textarea")) {
      if (field.type !== "hidden" && field.value !== field.defaultValue) return true;
    }
    return false;
  }

  document.addEventListener("focusout", () => {
    if (held && !editing()) { held = false; refresh(); }
  });

  async function refresh() {
    if (pending) return;
    if (editing()) { held = true; return; }
    pending = true;
    try {
      const answer = await fetch(location.href, {
        headers: { "X-Console-Fragment": "1" }, credentials: "same-origin", cache: "no-store",
      });
      if (!answer.ok) {
        live(false, `could not refresh this page: the console answered ${answer.status}`);
      } else {
        const focused = document.activeElement && document.activeElement.name;
        document.getElementById("content").innerHTML = await answer.text();
        loadDeferred();
        if (focused) {
          const again = document.querySelector(`[name="${focused}"]`);
          if (again) again.focus();
        }
        document.body.dataset.updated = String(Date.now());
      }
    } catch (err) {
      live(false, `could not refresh this page: ${err}`);
    } finally {
      pending = false;
    }
  }

  async function loadDeferred() {
    for (const holder of document.querySelectorAll("[data-load]")) {
      const answer = await fetch(holder.dataset.load, {
        headers: { "X-Console-Fragment": "1" }, credentials: "same-origin",
      });
      if (answer.ok) holder.innerHTML = await answer.text();
    }
  }

  loadDeferred();
  if (shows.length && window.EventSource) {
    const events = new EventSource("/events");
    events.onopen = () => live(true);
    events.onerror = () => live(false, "the console is not answering");
    events.onmessage = (event) => {
      const changed = JSON.parse(event.data).changed || [];
      if (changed.includes("unreachable")) live(false, "the server's admin API is not answering");
      if (changed.includes("reachable")) live(true);
      if (changed.some((what) => shows.includes(what))) refresh();
    };
  }
})();
