/* onetag demo: stand-in for the sendlane browser library (the demo has no internet).
 * It only records that it loaded. It does not touch window._Sendlane (an array of {event, ...} objects),
 * so the demo's "What onetag sees" panel can show every call onetag made. */
(function () {
  var stubs = window.__onetagDemoStubs = window.__onetagDemoStubs || {};
  stubs.sendlane = true;
})();
