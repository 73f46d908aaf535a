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

  onetag.starters = [onetag.confirmForms];
  document.addEventListener("DOMContentLoaded", function () {
    onetag.starters.forEach(function (start) { start(document); });
  });
})();
