// The explorer's only script: the saga list refreshes itself in place (filters live in the URL,
// the scroll position stays because only the table's contents change), and actions ask first.
(function () {
  "use strict";
  var listing = document.getElementById("listing");
  if (listing) {
    var busy = false;
    setInterval(function () {
      if (busy || document.hidden) return;
      busy = true;
      fetch(listing.dataset.poll, { credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) { if (html !== null) listing.innerHTML = html; })
        .catch(function () {})
        .then(function () { busy = false; });
    }, 2000);
  }
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
  document.querySelectorAll("form.filters select").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
  // Opening an event from the timeline unfolds it in the tree.
  function openHash() {
    var target = location.hash && document.getElementById(location.hash.slice(1));
    if (target && target.tagName === "DETAILS") target.open = true;
  }
  window.addEventListener("hashchange", openHash);
  openHash();
})();
