/* onetag operator console: a few lines of plain JS, no framework.
 * Each feature starts from a data- attribute in the page; data is written with textContent,
 * never innerHTML. POSTs from scripts send the page's CSRF token (body[data-csrf]) in the
 * X-CSRF-Token header. */
"use strict";
(function () {
  var onetag = (window.onetagConsole = window.onetagConsole || {});

  onetag.csrf = function () { return document.body.getAttribute("data-csrf") || ""; };

  /* Forms with data-confirm ask first. */
  onetag.confirmForms = function (root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });
  };

  function cell(row, text, className, href) {
    var td = document.createElement("td");
    if (className) td.className = className;
    if (href) {
      var a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text;
    }
    row.appendChild(td);
  }

  /* Live: rows from the page's Server-Sent Events stream, newest at the top. */
  var LIVE_MAX_ROWS = 500;
  onetag.live = function (root) {
    var table = root.querySelector("table[data-live-stream]");
    if (!table || !window.EventSource) return;
    var url = table.getAttribute("data-live-stream");
    if (!url) return;
    var body = table.tBodies[0];
    var status = document.getElementById("live-status");
    var source = new EventSource(url);
    source.onopen = function () { if (status) status.textContent = "live"; };
    /* CLOSED: the browser gave up (logged out, or too many Live streams open: 429). */
    source.onerror = function () {
      if (status) status.textContent = source.readyState === EventSource.CLOSED
        ? "stopped: reload the page" : "reconnecting…";
    };
    source.addEventListener("events", function (message) {
      var rows = JSON.parse(message.data);
      var empty = document.getElementById("live-empty");
      if (empty && rows.length) empty.remove();
      rows.forEach(function (data) {
        var tr = document.createElement("tr");
        tr.setAttribute("data-seq", String(data.seq));
        cell(tr, data.time, "", data.href);
        cell(tr, data.site);
        cell(tr, data.name);
        cell(tr, data.source);
        cell(tr, data.email);
        cell(tr, data.sc, "mono");
        cell(tr, data.summary, "wrap");
        body.insertBefore(tr, body.firstChild);
      });
      while (body.rows.length > LIVE_MAX_ROWS) body.deleteRow(body.rows.length - 1);
    });
    onetag.liveSource = source;
  };

  /* Install: "last event seen from this origin", refreshed from a small JSON endpoint. */
  onetag.originChecks = function (root) {
    var box = root.querySelector("[data-origin-check]");
    if (!box) return;
    var url = box.getAttribute("data-origin-check");
    function refresh() {
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (answer) { return answer.ok ? answer.json() : Promise.reject(answer.status); })
        .then(function (checks) {
          checks.forEach(function (check) {
            var row = box.querySelector('[data-origin="' + CSS.escape(check.site + " " + check.origin) + '"]');
            if (!row) return;
            row.querySelector(".seen").textContent = check.seen;
            row.querySelector(".seen").className = "seen " + (check.ok ? "ok" : "warn");
            row.querySelector(".event").textContent = check.event;
          });
          var when = box.querySelector(".checked");
          /* UTC, as every time in the console (toLocaleTimeString named no zone). */
          if (when) when.textContent = "checked " + new Date().toISOString().slice(11, 19) + " UTC";
        })
        .catch(function () {
          var when = box.querySelector(".checked");
          if (when) when.textContent = "check failed; retrying";
        });
    }
    var button = box.querySelector("button.refresh");
    if (button) button.addEventListener("click", refresh);
    window.setInterval(refresh, 10000);
  };

  onetag.starters = [onetag.confirmForms, onetag.live, onetag.originChecks];
  document.addEventListener("DOMContentLoaded", function () {
    onetag.starters.forEach(function (start) { start(document); });
  });
})();
