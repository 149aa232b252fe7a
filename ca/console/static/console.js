// Tessera console: keep the page current as the server changes, without a reload.
// The page names what it shows in <body data-live="...">; an event from /events whose
// "changed" list meets it re-fetches the page's content (X-Console-Fragment: 1).
"use strict";

(function () {
  const shows = (document.body.dataset.live || "").split(/\s+/).filter(Boolean);
  const state = document.getElementById("live-state");
  let pending = false;

  async function refresh() {
    if (pending) return;
    pending = true;
    try {
      const answer = await fetch(location.href, {
        headers: { "X-Console-Fragment": "1" }, credentials: "same-origin", cache: "no-store",
      });
      if (answer.ok) {
        const focused = document.activeElement && document.activeElement.name;
        document.getElementById("content").innerHTML = await answer.text();
        loadDeferred();
        if (focused) {
          const again = document.querySelector(`[name="${focused}"]`);
          if (again) again.focus();
        }
        document.body.dataset.updated = String(Date.now());
      }
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
    events.onopen = () => { state.classList.add("on"); state.classList.remove("off"); };
    events.onerror = () => { state.classList.add("off"); state.classList.remove("on"); };
    events.onmessage = (event) => {
      const changed = JSON.parse(event.data).changed || [];
      if (changed.some((what) => shows.includes(what))) refresh();
    };
  }
})();
