// Refreshes the live part of the operator page every two seconds. Served from the same
// origin: the page's Content-Security-Policy allows no inline script.
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  const url = live.dataset.refresh;
  async function refresh() {
    try {
      const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { window.location.reload(); return; }
      if (r.ok) live.innerHTML = await r.text();
    } catch (e) {
      // The service is restarting or the network dropped: try again next time.
    }
  }
  setInterval(refresh, 2000);
})();
