/* onetag demo: stand-in for the esputnik browser library (the demo has no internet).
 * It only records that it loaded. It does not touch window.eS.q (the loader's queue of arguments objects; window.eS stays the loader's function),
 * so the demo's "What onetag sees" panel can show every call onetag made. */
(function () {
  var stubs = window.__onetagDemoStubs = window.__onetagDemoStubs || {};
  stubs.esputnik = true;
})();
