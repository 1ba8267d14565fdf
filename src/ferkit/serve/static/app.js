// ferkit web page: send a photo (file, drop or webcam snapshot) to /v1/predict and draw what comes back.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
  const CLASS_COLORS = {
    happy: "#2e9e44", sad: "#3f6fd8", neutral: "#7d8597", angry: "#d7263d",
    surprise: "#f29e0c", fear: "#8e44ad", disgust: "#6b8e23",
  };
  let classes = [];
  let maxUploadBytes = null;
  let stream = null;
  let busy = false;

  function colorFor(label) {
    if (CLASS_COLORS[label]) return CLASS_COLORS[label];
    const i = Math.max(0, classes.indexOf(label));
    return PALETTE[i % PALETTE.length];
  }

  function setStatus(text) { $("status").textContent = text || ""; }

  function showError(message) {
    $("result").hidden = true;  // never leave an earlier photo's result looking like this one's
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
    canvas.dataset.state = "error";
    setStatus("");
  }

  function clearError() {
    const el = $("error");
    el.textContent = "";
    el.hidden = true;
  }

  function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%"; }

  // The server answers 401 without a key and 403 for a wrong one (only when it was started with --api-keys).
  function askForKey(status) {
    $("key-why").textContent = status === 403 ? "The key given was not accepted; check it and try again." :
      "Enter the key you were given.";
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    ferkitAuth.set($("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    clearError();
    loadModelInfo();
  });

  async function loadModelInfo() {
    try {
      const r = await ferkitAuth.fetch("/v1/models");
      if (r.status === 401 || r.status === 403) {
        $("model-info").textContent = "this server needs an API key";
        askForKey(r.status);
        return;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const info = await r.json();
      const m = info.loaded;
      classes = m.classes || [];
      maxUploadBytes = info.limits ? info.limits.max_upload_bytes : null;
      let text = `model ${m.name} (${m.arch}) · classes: ${classes.join(", ")} · input ${m.input_size}×${m.input_size}`;
      if (typeof m.val_accuracy === "number") text += ` · validation accuracy ${(100 * m.val_accuracy).toFixed(1)}%`;
      $("model-info").textContent = text;
    } catch (e) {
      $("model-info").textContent = "model information unavailable";
    }
  }

  // Decode the picture in the browser for display; null if the browser cannot (the server may still read it).
  async function decodeForDisplay(blob) {
    try {
      return await createImageBitmap(blob);
    } catch (e) {
      return null;
    }
  }

  async function analyse(blob, name) {
    if (busy) return;
    clearError();
    if (!blob || blob.size === 0) {
      showError(`${name || "file"}: the file is empty`);
      return;
    }
    if (maxUploadBytes && blob.size > maxUploadBytes) {
      const mb = (maxUploadBytes / 1048576).toFixed(1);
      showError(`${name}: the file is ${(blob.size / 1048576).toFixed(1)} MB; the limit is ${mb} MB`);
      return;
    }
    busy = true;
    canvas.dataset.state = "loading";
    setStatus(`analysing ${name}…`);
    const form = new FormData();
    form.append("file", blob, name || "photo.jpg");
    const detect = $("detect").checked;
    try {
      const [resp, bitmap] = await Promise.all([
        ferkitAuth.fetch(`/v1/predict?detect=${detect}`, { method: "POST", body: form }),
        decodeForDisplay(blob),
      ]);
      let body = null;
      try { body = await resp.json(); } catch (e) { body = null; }
      if (!resp.ok) {
        let detail = body && typeof body.detail === "string" ? body.detail : resp.statusText || `HTTP ${resp.status}`;
        if (detail.startsWith(`${name}: `)) detail = detail.slice(name.length + 2);  // the server names it too
        if (resp.status === 401 || resp.status === 403) askForKey(resp.status);
        const hint = resp.status === 503 ? " (the server is busy; try again in a moment)" :
          resp.status === 429 ? ` (too many requests; try again in ${resp.headers.get("Retry-After") || "a few"} s)` : "";
        showError(`Could not analyse ${name}: ${detail}${hint}`);
        return;
      }
      render(body, bitmap, name);
      setStatus(`${name}: ${body.faces.length} face(s) in ${body.time_ms} ms`);
      canvas.dataset.state = "done";
    } catch (e) {
      showError(`Could not reach the server: ${e.message || e}`);
    } finally {
      busy = false;
    }
  }

  function countLabels(faces) {
    const n = {};
    for (const f of faces) n[f.label] = (n[f.label] || 0) + 1;
    return Object.entries(n).sort((a, b) => b[1] - a[1]).map(([l, k]) => `${k} ${l}`).join(", ");
  }

  function render(result, bitmap, name) {
    const faces = result.faces || [];
    const W = result.image.width;
    const H = result.image.height;
    // Fit the display area; small photos are enlarged so their faces stay visible.
    const scale = Math.min(900 / W, 640 / H);
    canvas.width = Math.max(1, Math.round(W * scale));
    canvas.height = Math.max(1, Math.round(H * scale));
    ctx.imageSmoothingQuality = "high";
    if (bitmap) {
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    } else {
      ctx.fillStyle = "#d5d9e2";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.fillStyle = "#556";
      ctx.font = "16px system-ui, sans-serif";
      ctx.fillText("(this browser cannot show this image format)", 12, 28);
    }
    const lw = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 200));
    const fontPx = Math.max(16, Math.round(Math.max(canvas.width, canvas.height) / 48));
    faces.forEach((f, i) => {
      const [x, y, w, h] = f.box.map((v) => v * scale);
      const color = colorFor(f.label);
      ctx.strokeStyle = color;
      ctx.lineWidth = lw;
      ctx.strokeRect(x, y, w, h);
      const text = `${i + 1} ${f.label} ${pct(f.score)}`;
      ctx.font = `600 ${fontPx}px system-ui, sans-serif`;
      const tw = ctx.measureText(text).width + 10;
      const th = fontPx + 8;
      // Caption above the box; inside its top edge when there is no room above. Always within the canvas.
      const ty = y - th >= 0 ? y - th : Math.max(0, y);
      const tx = Math.max(0, Math.min(x - lw / 2, canvas.width - tw));
      ctx.fillStyle = color;
      ctx.fillRect(tx, ty, tw, th);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, tx + 5, ty + fontPx + 1);
    });
    canvas.dataset.faces = String(faces.length);
    canvas.setAttribute("aria-label", `${name}: ${faces.length} face(s) found`);

    const summary = faces.length === 0
      ? "No face found — untick “find faces first” to classify the whole image"
      : faces.length === 1 ? `1 face: ${faces[0].label}` : `${faces.length} faces: ${countLabels(faces)}`;
    $("summary").textContent = summary;
    const list = $("faces");
    list.replaceChildren();
    const names = result.classes || classes;
    faces.forEach((f, i) => {
      const li = document.createElement("li");
      li.className = "face";
      li.dataset.label = f.label;
      const head = document.createElement("div");
      head.className = "face-head";
      const num = document.createElement("span");
      num.className = "face-num";
      num.textContent = String(i + 1);
      num.style.background = colorFor(f.label);
      const label = document.createElement("span");
      label.className = "face-label";
      label.textContent = f.label;
      const score = document.createElement("span");
      score.className = "face-score";
      score.textContent = pct(f.score);
      head.append(num, label, score);
      li.append(head);
      for (const c of names) {
        const p = (f.scores && f.scores[c]) || 0;
        const row = document.createElement("div");
        row.className = "bar-row";
        const n = document.createElement("span");
        n.className = "bar-name";
        n.textContent = c;
        const bar = document.createElement("div");
        bar.className = "bar";
        const fill = document.createElement("div");
        fill.style.width = `${(100 * p).toFixed(1)}%`;
        fill.style.background = colorFor(c);
        bar.append(fill);
        const v = document.createElement("span");
        v.className = "bar-val";
        v.textContent = pct(p);
        row.append(n, bar, v);
        li.append(row);
      }
      list.append(li);
    });
    $("result").hidden = false;
  }

  // File input and drag-and-drop.
  $("file-input").addEventListener("change", (ev) => {
    const file = ev.target.files && ev.target.files[0];
    if (file) analyse(file, file.name);
    ev.target.value = "";  // choosing the same file again fires change again
  });
  const dz = $("dropzone");
  ["dragenter", "dragover"].forEach((t) => dz.addEventListener(t, (ev) => {
    ev.preventDefault();
    dz.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => dz.addEventListener(t, () => dz.classList.remove("over")));
  dz.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const file = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (file) analyse(file, file.name);
    else showError("Nothing to analyse: drop an image file");
  });
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  document.addEventListener("paste", (ev) => {
    const item = [...(ev.clipboardData ? ev.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) analyse(item.getAsFile(), "pasted image");
  });

  // Webcam snapshots.
  async function startWebcam() {
    clearError();
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("This browser offers no webcam access here (it needs https or localhost).");
      return;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 }, height: { ideal: 720 } } });
    } catch (e) {
      showError(`Cannot use the webcam: ${e.name === "NotAllowedError" ? "permission denied" : e.message || e.name}`);
      return;
    }
    $("video").srcObject = stream;
    $("webcam").hidden = false;
    $("webcam-start").disabled = true;
  }

  function stopWebcam() {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    $("video").srcObject = null;
    $("webcam").hidden = true;
    $("webcam-start").disabled = false;
  }

  function snapshot() {
    const video = $("video");
    if (!video.videoWidth) {
      showError("The webcam has not started yet; try again in a moment.");
      return;
    }
    const c = document.createElement("canvas");
    c.width = video.videoWidth;
    c.height = video.videoHeight;
    c.getContext("2d").drawImage(video, 0, 0);
    c.toBlob((blob) => analyse(blob, "webcam snapshot.jpg"), "image/jpeg", 0.92);
  }

  $("webcam-start").addEventListener("click", startWebcam);
  $("webcam-stop").addEventListener("click", stopWebcam);
  $("snap").addEventListener("click", snapshot);

  loadModelInfo();
})();
