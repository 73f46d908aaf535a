/* onetag demo: stand-in for the remarkety browser library (the demo has no internet).
 * It only records that it loaded. It does not touch window._rmData (an array of [name, ...args] calls),
 * so the demo's "What onetag sees" panel can show every call onetag made. */
(function () {
  var stubs = window.__onetagDemoStubs = window.__onetagDemoStubs || {};
  stubs.remarkety = true;
})();
