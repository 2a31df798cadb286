// The console's only script: refresh fragments, show ages, select all. No inline script runs
// (the content security policy allows this file alone), and every fragment is HTML the
// server escaped.
"use strict";

function showAges(root) {
  const now = Date.now();
  root.querySelectorAll("[data-since-ms]").forEach((el) => {
    const s = Math.max(0, Math.round((now - Number(el.dataset.sinceMs)) / 1000));
    el.textContent = s < 60 ? `${s} s ago` : s < 3600 ? `${Math.floor(s / 60)} min ago`
      : `${Math.floor(s / 3600)} h ago`;
  });
}

function keepFresh(el) {
  const every = Number(el.dataset.every) || 3000;
  const tick = async () => {
    try {
      const answer = await fetch(el.dataset.refresh, { credentials: "same-origin" });
      if (answer.ok) {
        el.innerHTML = await answer.text();
        showAges(el);
      }
    } catch (e) {
      // The console restarting or the network gone: try again at the next tick.
    }
    if (!el.querySelector("[data-final]")) setTimeout(tick, every);
  };
  if (!el.querySelector("[data-final]")) setTimeout(tick, every);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(keepFresh);
  showAges(document);
  setInterval(() => showAges(document), 1000);
  document.querySelectorAll("[data-select-all]").forEach((box) => {
    box.addEventListener("change", () => {
      box.form.querySelectorAll('input[name="fp"]').forEach((b) => { b.checked = box.checked; });
    });
  });
});
