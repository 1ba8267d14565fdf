// ferkit web page, live mode: webcam frames go one at a time to /v1/track?session=…; each face is drawn with its
// track ID and smoothed expression, and a small timeline shows each track's smoothed label over the last 20 s.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const COLORS = {
    happy: "#2e9e44", sad: "#3f6fd8", neutral: "#7d8597", angry: "#d7263d",
    surprise: "#f29e0c", fear: "#8e44ad", disgust: "#6b8e23",
  };
  const WINDOW_S = 20;      // seconds the timeline shows
  const SEND_SIDE = 640;    // frames are scaled down to this longest side before sending (what the detector uses)
  const canvas = $("live-canvas");
  const ctx = canvas.getContext("2d");
  const tl = $("live-timeline");
  const tctx = tl.getContext("2d");
  let running = false;
  let session = "";
  let history = new Map();  // track → [{t, label, score}]
  let frames = 0;
  let t0 = 0;
  const color = (label) => COLORS[label] || "#444";

  function newSession() {
    const a = new Uint8Array(12);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function grab(video) {
    const k = Math.min(1, SEND_SIDE / Math.max(video.videoWidth, video.videoHeight));
    const c = document.createElement("canvas");
    c.width = Math.round(video.videoWidth * k);
    c.height = Math.round(video.videoHeight * k);
    c.getContext("2d").drawImage(video, 0, 0, c.width, c.height);
    return new Promise((resolve) => c.toBlob((b) => resolve([b, c]), "image/jpeg", 0.85));
  }

  function draw(frame, result) {
    canvas.width = frame.width;
    canvas.height = frame.height;
    ctx.drawImage(frame, 0, 0);
    const fontPx = Math.max(14, Math.round(frame.width / 40));
    ctx.font = `600 ${fontPx}px system-ui, sans-serif`;
    for (const f of result.faces) {
      const [x, y, w, h] = f.box;
      const sm = f.smoothed || { label: f.label, score: f.score };
      const c = color(sm.label);
      ctx.strokeStyle = c;
      ctx.lineWidth = 3;
      ctx.strokeRect(x, y, w, h);
      const text = f.track != null ? `#${f.track} ${sm.label} ${Math.round(100 * sm.score)}%` : `${f.label} (new)`;
      const tw = ctx.measureText(text).width + 10;
      const th = fontPx + 8;
      const ty = y - th >= 0 ? y - th : y;
      ctx.fillStyle = c;
      ctx.fillRect(x, ty, tw, th);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x + 5, ty + fontPx + 1);
    }
  }

  function drawTimeline(now) {
    const ids = [...history.keys()].sort((a, b) => a - b).slice(-4);
    const rowH = ids.length ? Math.min(22, (tl.height - 14) / ids.length) : 22;
    tctx.clearRect(0, 0, tl.width, tl.height);
    tctx.font = "12px system-ui, sans-serif";
    const x0 = 34;
    const span = tl.width - x0 - 4;
    ids.forEach((id, row) => {
      const pts = history.get(id).filter((p) => now - p.t <= WINDOW_S);
      history.set(id, pts);
      const y = 4 + row * rowH;
      tctx.fillStyle = "#333";
      tctx.fillText(`#${id}`, 4, y + rowH * 0.7);
      for (let i = 0; i < pts.length; i++) {
        const p = pts[i];
        const next = i + 1 < pts.length ? pts[i + 1].t : p.t + 0.2;
        const xa = x0 + span * (1 - (now - p.t) / WINDOW_S);
        const xb = x0 + span * (1 - (now - Math.min(next, p.t + 1)) / WINDOW_S);
        tctx.fillStyle = color(p.label);
        tctx.globalAlpha = 0.35 + 0.65 * p.score;  // stronger expressions darker
        tctx.fillRect(xa, y, Math.max(1, xb - xa), rowH - 3);
      }
      tctx.globalAlpha = 1;
    });
    tctx.fillStyle = "#666";
    tctx.fillText(`-${WINDOW_S} s`, x0, tl.height - 2);
    tctx.fillText("now", tl.width - 28, tl.height - 2);
  }

  async function loop() {
    const video = $("video");
    let next = null;  // the next frame is captured and encoded while the server works on this one
    while (running) {
      if (!video.videoWidth) { await new Promise((r) => setTimeout(r, 100)); continue; }
      const [blob, frame] = await (next || grab(video));
      let resp;
      try {
        const sent = ferkitAuth.fetch(`/v1/track?session=${session}`, {
          method: "POST", body: blob, headers: { "Content-Type": "image/jpeg" },
        });
        next = grab(video);
        resp = await sent;
      } catch (e) {
        next = null;
        $("live-stats").textContent = `server unreachable: ${e.message || e}`;
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      if (!resp.ok) {
        let detail = `HTTP ${resp.status}`;
        try { detail = (await resp.json()).detail || detail; } catch (e) { /* not JSON */ }
        $("live-stats").textContent = `live tracking paused: ${detail}`;
        await new Promise((r) => setTimeout(r, resp.status === 503 || resp.status === 429 ? 1000 : 3000));
        continue;
      }
      const result = await resp.json();
      if (!running) break;
      frames += 1;
      const now = (performance.now() - t0) / 1000;
      for (const f of result.faces) {
        if (f.track == null || !f.smoothed) continue;
        if (!history.has(f.track)) history.set(f.track, []);
        history.get(f.track).push({ t: now, label: f.smoothed.label, score: f.smoothed.score });
      }
      draw(frame, result);
      drawTimeline(now);
      const fps = frames / Math.max(now, 1e-3);
      canvas.dataset.frames = String(frames);
      canvas.dataset.fps = fps.toFixed(2);
      canvas.dataset.tracks = [...history.keys()].join(",");
      const faces = result.faces.map((f) => (f.track != null && f.smoothed ? `#${f.track} ${f.smoothed.label}` : "new face"));
      $("live-stats").textContent = `${fps.toFixed(1)} frames/s · ${result.time_ms} ms per frame · ` +
        (faces.length ? faces.join(", ") : "no face");
    }
  }

  function start() {
    if (running) return;
    running = true;
    session = newSession();  // a fresh session: IDs start again from 1
    history = new Map();
    frames = 0;
    t0 = performance.now();
    $("live").hidden = false;
    $("live-start").hidden = true;
    $("live-stop").hidden = false;
    loop();
  }

  function stop() {
    running = false;
    $("live-start").hidden = false;
    $("live-stop").hidden = true;
  }

  $("live-start").addEventListener("click", start);
  $("live-stop").addEventListener("click", stop);
  $("webcam-stop").addEventListener("click", () => { stop(); $("live").hidden = true; });
})();
