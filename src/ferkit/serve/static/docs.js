// A self-contained reader for /openapi.json (FastAPI's Swagger page needs a CDN; this page needs no network).
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
  $("api-info").textContent = `${spec.info.title} ${spec.info.version} · OpenAPI ${spec.openapi} · ` +
    (spec.info.description || "");
  const root = $("endpoints");
  for (const [path, ops] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = el("section", { className: "panel endpoint" });
      sec.append(el("h2", {}, el("span", { className: `method ${method}`, textContent: method.toUpperCase() }), path));
      if (op.summary) sec.append(el("p", { textContent: op.summary }));
      if (op.description) sec.append(el("p", { className: "muted", textContent: op.description }));
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
      sec.append(table(["status", "description"], Object.entries(op.responses || {}).map(([code, r]) =>
        [code, r.description || ""])));
      root.append(sec);
    }
  }
})();
