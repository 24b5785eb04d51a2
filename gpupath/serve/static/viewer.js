// gpupath viewer: Deep Zoom tiles on a canvas, detection boxes from /api/detections.
// State in the URL hash: #slide=<id>&level=<DZI level>&x=<level-0 px>&y=<level-0 px> (view centre).
"use strict";
(function () {
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const statusEl = document.getElementById("status");
  const token = new URLSearchParams(location.search).get("token");
  const FALLBACK = "#00ff00";           // a label without a colour from the server (not expected)
  let slides = [], cur = null;          // cur: {id, w, h, tile, ov, maxLevel, fmt}
  let view = {x: 0, y: 0, scale: 1};    // centre in level-0 px; screen px per level-0 px
  let dets = null, detTimer = null, detSeq = 0;
  const tiles = new Map();              // url -> Image
  let minScore = 0;

  function withToken(url) {
    return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
  }
  function getJSON(url) {
    return fetch(withToken(url)).then(r => { if (!r.ok) throw new Error(r.status + " " + url); return r.json(); });
  }
  function parseHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    return {slide: p.get("slide"), level: p.get("level"), x: p.get("x"), y: p.get("y")};
  }
  function writeHash() {
    if (!cur) return;
    const level = Math.log2(view.scale) + cur.maxLevel;
    const h = "#slide=" + cur.id + "&level=" + (Math.round(level * 100) / 100) +
      "&x=" + Math.round(view.x) + "&y=" + Math.round(view.y);
    history.replaceState(null, "", h);
  }
  function resize() {
    canvas.width = window.innerWidth; canvas.height = window.innerHeight; draw();
  }
  function dziLevel() {
    return Math.max(0, Math.min(cur.maxLevel, Math.ceil(cur.maxLevel + Math.log2(view.scale) - 1e-9)));
  }
  function viewport() {   // level-0 px box on screen
    const hw = canvas.width / 2 / view.scale, hh = canvas.height / 2 / view.scale;
    return [view.x - hw, view.y - hh, view.x + hw, view.y + hh];
  }
  function tileImage(level, col, row) {
    const url = "dzi/" + cur.id + "_files/" + level + "/" + col + "_" + row + "." + cur.fmt;
    let img = tiles.get(url);
    if (!img) {
      img = new Image();
      img.onload = draw;
      img.src = withToken(url);
      tiles.set(url, img);
      if (tiles.size > 600) tiles.delete(tiles.keys().next().value);
    }
    return img;
  }
  function drawLevel(level, load) {
    const ds = Math.pow(2, cur.maxLevel - level);
    const lw = Math.ceil(cur.w / ds), lh = Math.ceil(cur.h / ds);
    const [vx0, vy0, vx1, vy1] = viewport();
    const c0 = Math.max(0, Math.floor(vx0 / ds / cur.tile)), c1 = Math.min(Math.ceil(lw / cur.tile) - 1, Math.floor(vx1 / ds / cur.tile));
    const r0 = Math.max(0, Math.floor(vy0 / ds / cur.tile)), r1 = Math.min(Math.ceil(lh / cur.tile) - 1, Math.floor(vy1 / ds / cur.tile));
    let missing = 0;
    for (let row = r0; row <= r1; row++) for (let col = c0; col <= c1; col++) {
      const img = load ? tileImage(level, col, row) : tiles.get("dzi/" + cur.id + "_files/" + level + "/" + col + "_" + row + "." + cur.fmt);
      if (!img || !img.complete || !img.naturalWidth) { missing++; continue; }
      const tx0 = col * cur.tile - (col > 0 ? cur.ov : 0), ty0 = row * cur.tile - (row > 0 ? cur.ov : 0);
      const sx = (tx0 * ds - vx0) * view.scale, sy = (ty0 * ds - vy0) * view.scale;
      ctx.drawImage(img, sx, sy, img.naturalWidth * ds * view.scale, img.naturalHeight * ds * view.scale);
    }
    return missing;
  }
  function draw() {
    ctx.fillStyle = "#202020"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!cur) return;
    ctx.imageSmoothingEnabled = view.scale < 1;
    const level = dziLevel();
    for (let l = Math.max(0, level - 4); l < level; l++) drawLevel(l, false);  // coarser tiles already loaded
    const missing = drawLevel(level, true);
    drawDetections();
    statusEl.textContent = "level " + level + "/" + cur.maxLevel + (missing ? " · loading " + missing : "") +
      (dets ? " · " + dets.n + " detections" + (dets.mode === "density" ? " (density)" : "") : "");
  }
  function drawDetections() {
    if (!dets) return;
    const [vx0, vy0] = viewport(), s = view.scale;
    if (dets.mode === "density") {
      const g = dets.grid, max = Math.max(1, ...g.counts);
      for (let j = 0; j < g.ny; j++) for (let i = 0; i < g.nx; i++) {
        const c = g.counts[j * g.nx + i];
        if (!c) continue;
        ctx.fillStyle = "rgba(255,40,0," + (0.15 + 0.6 * c / max).toFixed(3) + ")";
        ctx.fillRect((g.x0 + i * g.cell_px - vx0) * s, (g.y0 + j * g.cell_px - vy0) * s, g.cell_px * s, g.cell_px * s);
      }
      return;
    }
    ctx.lineWidth = 2;
    const colours = dets.colours || [];   // per label index: the overlay's, report's and GeoJSON's colours
    for (const b of dets.boxes) {
      if (b[4] < minScore) continue;
      ctx.strokeStyle = colours[b[5]] || FALLBACK;
      ctx.strokeRect(Math.round((b[0] - vx0) * s) + 1, Math.round((b[1] - vy0) * s) + 1,
                     Math.round((b[2] - b[0]) * s), Math.round((b[3] - b[1]) * s));
    }
  }
  function scheduleDetections() {
    clearTimeout(detTimer);
    detTimer = setTimeout(loadDetections, 120);
  }
  function loadDetections() {
    if (!cur || cur.n === null) { dets = null; draw(); return; }
    const [x0, y0, x1, y1] = viewport(), seq = ++detSeq;
    const url = "api/detections/" + cur.id + "?x0=" + Math.floor(x0) + "&y0=" + Math.floor(y0) + "&x1=" + Math.ceil(x1) +
      "&y1=" + Math.ceil(y1) + "&min_score=" + minScore + "&max_boxes=3000";
    getJSON(url).then(d => { if (seq === detSeq) { dets = d; legend(); draw(); } }).catch(e => { statusEl.textContent = String(e); });
  }
  function legend() {
    const el = document.getElementById("legend");
    el.textContent = "";
    (dets ? dets.labels : []).forEach((name, i) => {
      const row = document.createElement("div"), sw = document.createElement("span");
      sw.style.background = (dets.colours || [])[i] || FALLBACK;
      row.appendChild(sw); row.appendChild(document.createTextNode(name));   // text, never HTML
      el.appendChild(row);
    });
  }
  function changed() { writeHash(); draw(); scheduleDetections(); }
  function select(id, h) {
    const s = slides.find(s => s.id === id);
    if (!s || !s.dzi) return;
    cur = {id: s.id, w: s.width_px, h: s.height_px, tile: s.dzi.tile_px, ov: s.dzi.overlap_px,
           maxLevel: s.dzi.max_level, fmt: s.dzi.format, n: s.n_detections};
    tiles.clear(); dets = null;
    const fit = Math.min(canvas.width / cur.w, canvas.height / cur.h);
    const level = h && h.level !== null && isFinite(+h.level) ? +h.level : null;
    view.scale = level === null ? fit : Math.pow(2, level - cur.maxLevel);
    view.x = h && h.x !== null && isFinite(+h.x) ? +h.x : cur.w / 2;
    view.y = h && h.y !== null && isFinite(+h.y) ? +h.y : cur.h / 2;
    document.querySelectorAll("#slides li").forEach(li => li.classList.toggle("sel", li.dataset.id === id));
    changed();
  }
  // pan and zoom
  let drag = null;
  canvas.addEventListener("mousedown", e => { drag = {x: e.clientX, y: e.clientY}; canvas.style.cursor = "grabbing"; });
  window.addEventListener("mouseup", () => { drag = null; canvas.style.cursor = "grab"; });
  window.addEventListener("mousemove", e => {
    if (!drag || !cur) return;
    view.x -= (e.clientX - drag.x) / view.scale; view.y -= (e.clientY - drag.y) / view.scale;
    drag = {x: e.clientX, y: e.clientY}; changed();
  });
  canvas.addEventListener("wheel", e => {
    if (!cur) return;
    e.preventDefault();
    const f = Math.pow(2, -e.deltaY / 300), mx = e.clientX - canvas.width / 2, my = e.clientY - canvas.height / 2;
    const px = view.x + mx / view.scale, py = view.y + my / view.scale;   // keep the point under the mouse
    view.scale = Math.min(8, Math.max(Math.pow(2, -cur.maxLevel), view.scale * f));
    view.x = px - mx / view.scale; view.y = py - my / view.scale; changed();
  }, {passive: false});
  document.getElementById("score").addEventListener("input", e => {
    minScore = +e.target.value; document.getElementById("scoreval").textContent = minScore.toFixed(2);
    draw(); scheduleDetections();
  });
  document.getElementById("toggle").addEventListener("click", e => {
    e.preventDefault(); const p = document.getElementById("panel");
    p.classList.toggle("hidden"); e.target.textContent = p.classList.contains("hidden") ? "show" : "hide";
  });
  window.addEventListener("resize", resize);
  window.addEventListener("hashchange", () => { const h = parseHash(); if (h.slide && (!cur || h.slide !== cur.id)) select(h.slide, h); });
  canvas.width = window.innerWidth; canvas.height = window.innerHeight;
  getJSON("api/slides").then(d => {
    slides = d.slides;
    const ul = document.getElementById("slides");
    for (const s of slides) {
      const li = document.createElement("li");
      li.dataset.id = s.id;
      li.textContent = s.name + (s.n_detections === null ? "" : " (" + s.n_detections.toLocaleString() + ")");
      li.title = s.id;
      li.addEventListener("click", () => select(s.id, null));
      ul.appendChild(li);
    }
    const h = parseHash();
    if (h.slide) select(h.slide, h); else if (slides.length) select(slides[0].id, null);
  }).catch(e => { statusEl.textContent = String(e); });
})();
