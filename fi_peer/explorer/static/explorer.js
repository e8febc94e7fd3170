// fi-peer explorer: keeps the numbers live. The pages work without it.
// Polls /api/overview.json; writes text only (textContent), never markup.
"use strict";
(function () {
  const PERIOD_MS = 2000;
  const dot = document.getElementById("live");

  function setLive(up) {
    if (!dot) return;
    dot.textContent = up ? "live" : "offline";
    dot.className = "dot " + (up ? "up" : "down");
  }

  async function poll() {
    if (document.hidden) return;
    let data;
    try {
      const response = await fetch("/api/overview.json", { cache: "no-store" });
      if (!response.ok) { setLive(false); return; }
      data = await response.json();
    } catch (e) {
      setLive(false);
      return;
    }
    setLive(Boolean(data.live));
    const values = data.values || {};
    for (const el of document.querySelectorAll("[data-live]")) {
      const value = values[el.dataset.live];
      if (!value || el.textContent === value.text) continue;
      el.textContent = value.text;
      if (value.wei !== null) {
        el.dataset.wei = value.wei;
        el.title = BigInt(value.wei).toLocaleString("en-US") + " wei";
      }
      el.classList.add("flash");
      setTimeout(() => el.classList.remove("flash"), 1500);
    }
  }

  setInterval(poll, PERIOD_MS);
})();
