// A self-contained, interactive reader for /openapi.json (FastAPI's Swagger page needs a CDN; this page needs no
// network): every endpoint with its parameters, request body and response bodies, and a form to try it.
"use strict";

(async () => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const e = Object.assign(document.createElement(tag), props);
    e.append(...children);
    return e;
  };

  function table(head, rows) {
    const t = el("table");
    t.append(el("tr", {}, ...head.map((h) => el("th", { textContent: h }))));
    for (const r of rows) t.append(el("tr", {}, ...r.map((c) => el("td", { textContent: c }))));
    return t;
  }

  let spec;
  try {
    const r = await fetch("/openapi.json");
    if (!r.ok) throw new Error("HTTP " + r.status);
    spec = await r.json();
  } catch (e) {
    const err = $("error");
    err.textContent = `Cannot read /openapi.json: ${e.message || e}`;
    err.hidden = false;
    return;
  }
  const schemas = (spec.components && spec.components.schemas) || {};
  const deref = (s) => (s && s.$ref ? schemas[s.$ref.split("/").pop()] || {} : s || {});
  const refName = (s) => (s && s.$ref ? s.$ref.split("/").pop() : "");

  function typeOf(s) {
    if (!s) return "";
    if (s.$ref) return refName(s);
    if (s.anyOf) return s.anyOf.map(typeOf).join(" | ");
    if (s.type === "array") return `array of ${typeOf(s.items)}`;
    if (s.type === "object" && s.additionalProperties) return `object of ${typeOf(s.additionalProperties)}`;
    return s.type || "";
  }

  // The fields of a response body: one table per model, nested models listed after it (each once).
  function describeSchema(s, seen = new Set()) {
    const name = refName(s) || refName(s && s.items);
    const body = deref(s && s.type === "array" ? s.items : s);
    if (!body.properties || seen.has(name)) return [];
    seen.add(name);
    const required = new Set(body.required || []);
    const out = [el("p", { className: "muted", textContent: `${name || "body"}: ${body.description || ""}` }),
      table(["field", "type", "description"], Object.entries(body.properties).map(([k, v]) =>
        [k + (required.has(k) ? "" : " (optional)"), typeOf(v), v.description || deref(v).description || ""]))];
    for (const v of Object.values(body.properties)) {
      for (const inner of [v, v.items, v.additionalProperties, ...(v.anyOf || [])]) {
        if (inner && (inner.$ref || (inner.items && inner.items.$ref))) out.push(...describeSchema(inner, seen));
      }
    }
    return out;
  }

  // Try it: the form sends the request from this page (with the API key, if one is set) and shows the answer.
  function tryForm(path, method, op) {
    const form = el("form", { className: "try" });
    const params = (op.parameters || []).filter((p) => p.in === "query");
    const inputs = params.map((p) => {
      const input = el("input", { name: p.name, placeholder: p.schema && "default" in p.schema ? String(p.schema.default) : "" });
      form.append(el("label", {}, `${p.name} `, input));
      return input;
    });
    const content = (op.requestBody && op.requestBody.content) || {};
    let file = null;
    if (content["multipart/form-data"]) {
      file = el("input", { type: "file", name: "file", className: "try-file" });
      form.append(el("label", {}, "file ", file));
    }
    const send = el("button", { type: "submit", className: "button primary try-send", textContent: `Send ${method.toUpperCase()}` });
    const out = el("pre", { className: "try-out", hidden: true });
    form.append(send, out);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams();
      params.forEach((p, i) => { if (inputs[i].value !== "") q.set(p.name, inputs[i].value); });
      const url = path + (q.toString() ? `?${q}` : "");
      const opts = { method: method.toUpperCase() };
      if (file) {
        if (!file.files.length) { out.hidden = false; out.textContent = "choose a file first"; return; }
        const fd = new FormData();
        fd.append("file", file.files[0]);
        opts.body = fd;
      }
      out.hidden = false;
      out.textContent = `${opts.method} ${url} …`;
      try {
        const t0 = performance.now();
        const r = await ferkitAuth.fetch(url, opts);
        const text = await r.text();
        let shown = text;
        try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* not JSON: as it came */ }
        if (shown.length > 20000) shown = shown.slice(0, 20000) + "\n…";
        out.dataset.status = String(r.status);
        out.textContent = `HTTP ${r.status} ${r.statusText} · ${(performance.now() - t0).toFixed(0)} ms · ` +
          `X-Request-ID ${r.headers.get("X-Request-ID") || "-"}\n\n${shown}`;
      } catch (e) {
        out.dataset.status = "error";
        out.textContent = `request failed: ${e.message || e}`;
      }
    });
    return form;
  }

  $("api-info").textContent = `${spec.info.title} ${spec.info.version} · OpenAPI ${spec.openapi} · ` +
    (spec.info.description || "");
  const key = $("docs-key");
  key.value = ferkitAuth.key();
  key.addEventListener("change", () => ferkitAuth.set(key.value.trim()));

  const root = $("endpoints");
  for (const [path, ops] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = el("section", { className: "panel endpoint" });
      sec.dataset.path = path;
      sec.dataset.method = method;
      sec.append(el("h2", {}, el("span", { className: `method ${method}`, textContent: method.toUpperCase() }), path));
      if (op.summary) sec.append(el("p", { textContent: op.summary }));
      if (op.description) sec.append(el("p", { className: "muted", textContent: op.description }));
      if (op.security && op.security.length) {
        sec.append(el("p", { className: "muted needs-key", textContent:
          "Needs an API key when the server has them: Authorization: Bearer KEY or X-API-Key: KEY." }));
      }
      const params = op.parameters || [];
      if (params.length) {
        sec.append(el("h3", { textContent: "Parameters" }));
        sec.append(table(["name", "in", "type", "default", "description"], params.map((p) => [
          p.name, p.in, (p.schema && p.schema.type) || "", p.schema && "default" in p.schema ? String(p.schema.default) : "",
          p.description || (p.schema && p.schema.description) || "",
        ])));
      }
      if (op.requestBody) {
        sec.append(el("h3", { textContent: "Request body" }));
        sec.append(table(["content type", "schema"], Object.entries(op.requestBody.content || {}).map(([ct, c]) =>
          [ct, JSON.stringify(c.schema || {})])));
      }
      sec.append(el("h3", { textContent: "Responses" }));
      const responses = Object.entries(op.responses || {});
      sec.append(table(["status", "description", "body"], responses.map(([code, r]) => {
        const c = r.content || {};
        const ct = Object.keys(c)[0];
        return [code, r.description || "", ct ? `${ct} ${typeOf(c[ct].schema) || ""}`.trim() : ""];
      })));
      const ok = responses.find(([code]) => code.startsWith("2"));
      const okSchema = ok && ok[1].content && ok[1].content["application/json"] && ok[1].content["application/json"].schema;
      if (okSchema) sec.append(...describeSchema(okSchema));
      sec.append(el("h3", { textContent: "Try it" }), tryForm(path, method, op));
      root.append(sec);
    }
  }
})();
