/* onetag demo: stand-in for the rejoiner browser library (the demo has no internet).
 * It only records that it loaded. It does not touch window._rejoiner (an array of [name, arg] calls),
 * so the demo's "What onetag sees" panel can show every call onetag made. */
(function () {
  var stubs = window.__onetagDemoStubs = window.__onetagDemoStubs || {};
  stubs.rejoiner = true;
})();
