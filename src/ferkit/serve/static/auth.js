// The API key, when the server needs one: kept for this browser tab only (sessionStorage), sent as a Bearer token.
// Shared by the web page (app.js) and the API page (docs.js); without a key nothing is added to requests.
"use strict";

window.ferkitAuth = (() => {
  const SLOT = "ferkit-api-key";
  const get = () => {
    try { return sessionStorage.getItem(SLOT) || ""; } catch (e) { return ""; }
  };
  const set = (key) => {
    try {
      if (key) sessionStorage.setItem(SLOT, key); else sessionStorage.removeItem(SLOT);
    } catch (e) { /* storage disabled: the key lasts until the page is left */ }
    memory = key || "";
  };
  let memory = get();
  const headers = () => (memory ? { Authorization: `Bearer ${memory}` } : {});
  return {
    key: () => memory,
    set,
    headers,
    fetch: (url, opts = {}) => fetch(url, { ...opts, headers: { ...(opts.headers || {}), ...headers() } }),
  };
})();
