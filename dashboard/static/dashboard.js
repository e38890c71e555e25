// medfed dashboard: keep the page's live part current without reloading.
// The page's <main id="live"> names the URL to poll (data-live-url) and the version it
// shows (data-version); the server answers with new HTML only when something changed.
(function () {
  "use strict";
  var INTERVAL_MS = 2000;
  var main = document.getElementById("live");
  if (!main || !main.dataset.liveUrl) {
    return;
  }
  var target = document.getElementById("live-part") || main;
  var status = document.getElementById("live-status");

  function show(text, kind) {
    if (status) {
      status.textContent = text;
      status.className = kind;
    }
  }

  function tick() {
    var url = main.dataset.liveUrl + "?version=" + encodeURIComponent(main.dataset.version || "");
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        if (typeof data.html === "string" && data.version !== main.dataset.version) {
          target.innerHTML = data.html;
          main.dataset.version = data.version;
          main.dataset.updates = String(Number(main.dataset.updates || "0") + 1);
        }
        show("live · checked " + new Date().toLocaleTimeString(), "ok");
      })
      .catch(function (err) {
        show("live updates paused (" + err.message + "), retrying", "error");
      })
      .then(function () {
        window.setTimeout(tick, INTERVAL_MS);
      });
  }

  show("live", "ok");
  window.setTimeout(tick, INTERVAL_MS);
})();
