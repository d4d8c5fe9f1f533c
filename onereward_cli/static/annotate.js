// The labelling page: shows one sample at a time, collects best / worst / "no difference" per
// dimension, and posts it to /api/submit. The server validates and appends; this page only asks.
// Candidates arrive in this annotator's shuffled order (sample.order); everything here works in shown
// positions, which the server maps back to candidate indices. Undo withdraws the last submitted sample.
"use strict";
(() => {
  const NODIFF = "no difference";
  const $ = (id) => document.getElementById(id);

  let sample = null;          // the sample on screen (null while loading or when finished)
  let labels = {};            // dimension -> {best, worst} (each null until chosen) | NODIFF
  let focus = 0;              // index of the focused dimension
  let busy = false;           // a request is in flight: ignore Enter / s until it returns
  let outlineCandidates = false;
  let imgs = null;            // {source, mask, cands: [Image]}
  let maskSegs = [];          // mask border as unit segments [x0, y0, x1, y1] in image pixels
  let maskTint = null;        // W x H canvas: translucent colour where the mask is set
  let zoomAt = null;          // null = closed, -1 = source, i = candidate at shown position i
  let messageTimer = null;
  let lastSubmitted = null;   // id of the annotator's last submitted sample (what undo withdraws)
  let digits = "";            // 10+ candidates: the digits typed so far ("1" may become 10, 11, ...)
  let digitsKind = null;
  let digitsTimer = null;

  // ------------------------------------------------------------------------------------------
  // Server
  // ------------------------------------------------------------------------------------------
  async function api(method, url, body) {
    const opt = { method, headers: {} };
    if (body !== undefined) {
      opt.headers["Content-Type"] = "application/json";
      opt.body = JSON.stringify(body);
    }
    const res = await fetch(url, opt);
    let data;
    try { data = await res.json(); } catch (_) { data = { error: `HTTP ${res.status}` }; }
    return { status: res.status, ok: res.ok, data };
  }

  function offline() {
    say("Cannot reach the server. Nothing of this sample is saved yet: restart `onereward annotate` " +
        "and press Enter again.", "error", 0);
  }

  async function loadState() {
    let res;
    try { res = await api("GET", "/api/state"); } catch (_) { offline(); return; }
    if (!res.ok) { say(res.data.error, "error", 0); return; }
    const st = res.data;
    $("annotator").textContent = st.annotator;
    lastSubmitted = st.last;
    renderUndo();
    renderProgress(st.progress);
    if (!st.sample) { finish(st.annotator); return; }
    await showSample(st.sample);
  }

  // ------------------------------------------------------------------------------------------
  // Images: the mask outline is drawn here, from the mask PNG, so any mask shape works.
  // ------------------------------------------------------------------------------------------
  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const im = new Image();
      im.onload = () => resolve(im);
      im.onerror = () => reject(new Error(`cannot load ${url}`));
      im.src = url;
    });
  }

  function analyseMask(mask, W, H) {
    const c = document.createElement("canvas");
    c.width = W; c.height = H;
    const g = c.getContext("2d", { willReadFrequently: true });
    g.imageSmoothingEnabled = false;
    g.drawImage(mask, 0, 0, W, H);
    const px = g.getImageData(0, 0, W, H);
    const d = px.data;
    const on = (x, y) => d[(y * W + x) * 4] >= 128;
    const segs = [];
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        if (!on(x, y)) continue;
        // Only borders with kept pixels: the image border is not a seam.
        if (y > 0 && !on(x, y - 1)) segs.push([x, y, x + 1, y]);
        if (y < H - 1 && !on(x, y + 1)) segs.push([x, y + 1, x + 1, y + 1]);
        if (x > 0 && !on(x - 1, y)) segs.push([x, y, x, y + 1]);
        if (x < W - 1 && !on(x + 1, y)) segs.push([x + 1, y, x + 1, y + 1]);
      }
    }
    for (let i = 0; i < d.length; i += 4) {
      const set = d[i] >= 128;
      d[i] = 255; d[i + 1] = 0; d[i + 2] = 170; d[i + 3] = set ? 36 : 0;
    }
    g.putImageData(px, 0, 0);
    return { segs, tint: c };
  }

  // Draw `img` into `canvas` at an integer upscale (true pixels, no blur) big enough for cssSize.
  function draw(canvas, img, { outline = false, tint = false, cssSize = 256 } = {}) {
    const W = img.naturalWidth, H = img.naturalHeight;
    const dpr = window.devicePixelRatio || 1;
    const s = Math.max(1, Math.ceil((cssSize * dpr) / Math.max(W, H)));
    canvas.width = W * s; canvas.height = H * s;
    const g = canvas.getContext("2d");
    g.imageSmoothingEnabled = false;
    g.drawImage(img, 0, 0, W * s, H * s);
    if (tint && maskTint) g.drawImage(maskTint, 0, 0, W * s, H * s);
    if (outline && maskSegs.length) {
      // Even widths centred on pixel borders cover whole pixels: a crisp line, no blur.
      const lw = 2 * Math.max(1, Math.round((0.6 * canvas.width) / cssSize));
      g.beginPath();
      for (const [x0, y0, x1, y1] of maskSegs) { g.moveTo(x0 * s, y0 * s); g.lineTo(x1 * s, y1 * s); }
      g.lineCap = "square";  // closes the corners between unit segments
      g.strokeStyle = "rgba(0,0,0,0.85)"; g.lineWidth = lw + 4; g.stroke();
      g.strokeStyle = "#ffd21f"; g.lineWidth = lw; g.stroke();
    }
  }

  // ------------------------------------------------------------------------------------------
  // Rendering
  // ------------------------------------------------------------------------------------------
  const dims = () => sample.dimensions.map((d) => d.name);
  const isDone = (v) => v === NODIFF || (v && v.best !== null && v.worst !== null);
  const abbrev = (name) => {
    const w = name.split(/\s+/);
    return w.length > 1 ? w.map((x) => x[0].toUpperCase()).join("") : name.slice(0, 3).replace(/^./, (c) => c.toUpperCase());
  };

  function renderProgress(p) {
    const pct = p.total ? (100 * p.done) / p.total : 0;
    $("progress-fill").style.width = `${pct}%`;
    $("progress-text").textContent = `${p.done} / ${p.total}` + (p.skipped ? ` · ${p.skipped} skipped` : "");
  }

  async function showSample(s) {
    sample = null;
    document.body.dataset.ready = "";
    let loaded;
    try {
      const [source, mask, ...cands] = await Promise.all(
        [s.source, s.mask, ...s.candidates.map((c) => c.url)].map(loadImage));
      loaded = { source, mask, cands };
    } catch (e) { say(String(e.message || e), "error", 0); return; }
    imgs = loaded;
    const a = analyseMask(imgs.mask, imgs.source.naturalWidth, imgs.source.naturalHeight);
    maskSegs = a.segs; maskTint = a.tint;
    sample = s;
    labels = {};
    for (const d of dims()) labels[d] = { best: null, worst: null };
    focus = 0;

    $("task-name").textContent = s.task_name;
    $("task-key").textContent = s.task;
    const pr = $("prompt");
    pr.classList.toggle("muted", !s.user_prompt);
    pr.textContent = s.user_prompt ? `“${s.user_prompt}”` :
      `none (the generator saw the fixed prompt “${s.prompt}”)`;
    $("sample-id").textContent = s.id;
    draw($("source"), imgs.source, { outline: true, tint: true, cssSize: 300 });
    buildCandidates();
    buildDims();
    render();
    $("main").hidden = false;
    $("finished").hidden = true;
    document.body.dataset.ready = s.id;
  }

  function buildCandidates() {
    const box = $("candidates");
    box.textContent = "";
    const n = sample.candidates.length;
    box.style.setProperty("--cols", n <= 5 ? n : Math.ceil(n / Math.ceil(n / 6)));  // rows of at most 6
    sample.candidates.forEach((c, i) => {
      const fig = document.createElement("figure");
      fig.className = "cand";
      fig.dataset.position = i;
      const cv = document.createElement("canvas");
      cv.className = "zoomable";
      cv.title = `candidate ${i + 1} (click to zoom)`;
      cv.addEventListener("click", () => openZoom(i));
      const cap = document.createElement("figcaption");
      const num = document.createElement("span");
      num.className = "num"; num.textContent = i + 1;
      const chips = document.createElement("span");
      chips.className = "chips";
      cap.append(num, chips);
      fig.append(cv, cap);
      box.append(fig);
    });
    drawCandidates();
  }

  function drawCandidates() {
    document.querySelectorAll("#candidates .cand canvas").forEach((cv, i) =>
      draw(cv, imgs.cands[i], { outline: outlineCandidates, cssSize: 200 }));
  }

  function buildDims() {
    const box = $("dims");
    box.textContent = "";
    const n = sample.candidates.length;
    sample.dimensions.forEach((d, k) => {
      const row = document.createElement("div");
      row.className = "dim";
      row.dataset.dim = d.name;
      row.addEventListener("click", () => { focus = k; render(); });
      const head = document.createElement("div");
      head.className = "dim-head";
      head.innerHTML = `<span class="dim-name"></span><span class="dim-abbr"></span><span class="dim-def"></span>`;
      head.querySelector(".dim-name").textContent = d.name;
      head.querySelector(".dim-abbr").textContent = abbrev(d.name);
      head.querySelector(".dim-def").textContent = d.definition;
      const picks = document.createElement("div");
      picks.className = "picks";
      for (const kind of ["best", "worst"]) {
        const grp = document.createElement("div");
        grp.className = `pickrow ${kind}`;
        const lbl = document.createElement("span");
        lbl.className = "lbl"; lbl.textContent = kind;
        grp.append(lbl);
        for (let i = 0; i < n; i++) {
          const b = document.createElement("button");
          b.type = "button"; b.tabIndex = -1; b.textContent = i + 1;
          b.dataset.kind = kind; b.dataset.index = i;
          b.addEventListener("click", (e) => { e.stopPropagation(); focus = k; choose(kind, i); });
          grp.append(b);
        }
        picks.append(grp);
      }
      const nd = document.createElement("button");
      nd.type = "button"; nd.tabIndex = -1; nd.className = "nodiff"; nd.textContent = NODIFF;
      nd.addEventListener("click", (e) => { e.stopPropagation(); focus = k; noDifference(); });
      picks.append(nd);
      const st = document.createElement("span");
      st.className = "status";
      row.append(head, picks, st);
      box.append(row);
    });
  }

  function render() {
    const names = dims();
    document.querySelectorAll("#dims .dim").forEach((row, k) => {
      const v = labels[names[k]];
      row.classList.toggle("focused", k === focus);
      row.classList.toggle("done", isDone(v));
      row.classList.toggle("is-nodiff", v === NODIFF);
      row.querySelectorAll(".picks button[data-kind]").forEach((b) => {
        const on = v !== NODIFF && v[b.dataset.kind] === Number(b.dataset.index);
        b.classList.toggle("on", on);
        b.setAttribute("aria-pressed", on);
      });
      row.querySelector(".nodiff").classList.toggle("on", v === NODIFF);
      row.querySelector(".status").textContent = isDone(v) ? "✓" : "";
    });
    const fv = labels[names[focus]];
    document.querySelectorAll("#candidates .cand").forEach((fig, i) => {
      fig.classList.toggle("best", fv !== NODIFF && fv.best === i);
      fig.classList.toggle("worst", fv !== NODIFF && fv.worst === i);
      const chips = fig.querySelector(".chips");
      chips.textContent = "";
      for (const d of names) {
        const v = labels[d];
        if (v === NODIFF) continue;
        for (const kind of ["best", "worst"]) {
          if (v[kind] !== i) continue;
          const c = document.createElement("span");
          c.className = `chip ${kind}`;
          c.title = `${kind}: ${d}`;
          c.textContent = `${kind === "best" ? "▲" : "▼"} ${abbrev(d)}`;
          chips.append(c);
        }
      }
    });
    const left = names.filter((d) => !isDone(labels[d])).length;
    $("submit").disabled = busy || left > 0;
    $("skip").disabled = busy;
    if (zoomAt !== null) drawZoom();
  }

  // ------------------------------------------------------------------------------------------
  // Choosing
  // ------------------------------------------------------------------------------------------
  function afterChange(wasDone) {
    const names = dims();
    if (!wasDone && isDone(labels[names[focus]])) {
      const next = names.findIndex((d, k) => k > focus && !isDone(labels[d]));
      if (next >= 0) focus = next;
      else if (focus < names.length - 1) focus += 1;
    }
    render();
  }

  function choose(kind, i) {
    if (!sample) return;
    const n = sample.candidates.length;
    if (i >= n) { say(`There are only ${n} candidates.`, "error"); return; }
    const d = dims()[focus];
    const wasDone = isDone(labels[d]);
    let v = labels[d];
    if (v === NODIFF) v = { best: null, worst: null };
    const other = kind === "best" ? "worst" : "best";
    if (v[other] === i) {
      v[other] = null;
      say(`Candidate ${i + 1} cannot be both best and worst: ${other} cleared.`, "info");
    }
    v[kind] = i;
    labels[d] = v;
    afterChange(wasDone);
  }

  function noDifference() {
    if (!sample) return;
    const d = dims()[focus];
    const wasDone = isDone(labels[d]);
    labels[d] = NODIFF;
    afterChange(wasDone);
  }

  function clearFocused() {
    if (!sample) return;
    labels[dims()[focus]] = { best: null, worst: null };
    render();
  }

  function move(delta) {
    if (!sample) return;
    focus = Math.min(dims().length - 1, Math.max(0, focus + delta));
    render();
  }

  async function submit() {
    if (busy || !sample) return;
    const names = dims();
    const missing = names.filter((d) => !isDone(labels[d]));
    if (missing.length) {
      focus = names.indexOf(missing[0]);
      render();
      say(`Still to choose: ${missing.join(", ")} (best and worst, or no difference).`, "error");
      return;
    }
    // Shown positions and the order they refer to; the server maps them to candidate indices.
    const body = { sample_id: sample.id, order: sample.order, shown: {} };
    for (const d of names) {
      const v = labels[d];
      body.shown[d] = v === NODIFF ? NODIFF : { best: v.best, worst: v.worst };
    }
    busy = true; render();
    try {
      const res = await api("POST", "/api/submit", body);
      if (res.ok) {
        say(`Saved ${sample.id} (u undoes it).`, "info");
        await loadState();
      } else if (res.status === 409) {
        say(res.data.error, "info");
        await loadState();
      } else {
        say(`Not saved: ${res.data.error}`, "error", 0);
      }
    } catch (_) {
      offline();
    } finally {
      busy = false;
      if (sample) render();
    }
  }

  async function skip() {
    if (busy || !sample) return;
    busy = true; render();
    const id = sample.id;
    try {
      const res = await api("POST", "/api/skip", { sample_id: id });
      if (!res.ok) { say(res.data.error, "error", 0); return; }
      say(`Skipped ${id}; it comes back after the others.`, "info");
      await loadState();
    } catch (_) {
      offline();
    } finally {
      busy = false;
      if (sample) render();
    }
  }

  async function undo() {
    if (busy || !lastSubmitted) return;
    busy = true;
    const id = lastSubmitted;
    try {
      const res = await api("POST", "/api/undo", { sample_id: id });
      if (!res.ok) { say(res.data.error, "error", 0); await loadState(); return; }
      await loadState();
      say(`Undid ${id}: it is back on screen; label it again.`, "info");
    } catch (_) {
      offline();
    } finally {
      busy = false;
      if (sample) render();
      renderUndo();
    }
  }

  function renderUndo() {
    const b = $("undo");
    b.disabled = busy || !lastSubmitted;
    b.title = lastSubmitted ? `withdraw the labels of ${lastSubmitted}` : "nothing submitted yet";
  }

  function finish(annotator) {
    sample = null;
    closeZoom();
    $("main").hidden = true;
    $("finished").hidden = false;
    $("finished-annotator").textContent = annotator;
    $("submit").disabled = true;
    $("skip").disabled = true;
    document.body.dataset.ready = "finished";
  }

  // ------------------------------------------------------------------------------------------
  // Zoom
  // ------------------------------------------------------------------------------------------
  function openZoom(i) {
    if (!sample) return;
    zoomAt = i;
    $("zoom").hidden = false;
    drawZoom();
  }

  function closeZoom() {
    zoomAt = null;
    $("zoom").hidden = true;
  }

  function drawZoom() {
    const n = sample.candidates.length;
    const size = Math.min(window.innerWidth, window.innerHeight - 60) * 0.9;
    const cv = $("zoom-canvas");
    if (zoomAt < 0) draw(cv, imgs.source, { outline: true, tint: true, cssSize: size });
    else draw(cv, imgs.cands[zoomAt], { outline: outlineCandidates, cssSize: size });
    cv.style.width = cv.style.height = "";
    const ratio = cv.width / cv.height;
    cv.style.width = `${ratio >= 1 ? size : size * ratio}px`;
    const d = dims()[focus];
    const v = labels[d];
    let mark = "";
    if (zoomAt >= 0 && v !== NODIFF) {
      if (v.best === zoomAt) mark = ` · best ${d}`;
      if (v.worst === zoomAt) mark = ` · worst ${d}`;
    }
    $("zoom-caption").textContent = (zoomAt < 0 ? "source (mask outlined)" : `candidate ${zoomAt + 1} of ${n}`) +
      mark + ` · ←/→ browse · 1…${n} / Shift+1…${n} label ` + `“${d}”` + " · Esc close";
  }

  // ------------------------------------------------------------------------------------------
  // Keyboard
  // ------------------------------------------------------------------------------------------
  const ZOOM_KEYS = ["ArrowUp", "ArrowDown", "j", "k", "o", "O", "n", "N", "Backspace", "Delete"];

  function digitOf(code) {
    const m = /^(?:Digit|Numpad)([0-9])$/.exec(code || "");
    return m ? Number(m[1]) : null;
  }

  // Up to 9 candidates a digit is a candidate. With 10 or more, a number is typed as its digits: it is
  // taken as soon as no further digit could extend it (or after a short pause), so "3" of 12 is 3 at
  // once and "1" waits for a second digit (1, 10, 11, 12). 0 alone is still "no difference".
  function typeDigit(d, kind) {
    const n = sample.candidates.length;
    if (n <= 9 || (digits === "" && d === 0)) {
      if (d === 0) noDifference(); else choose(kind, d - 1);
      return;
    }
    if (digits && digitsKind !== kind) takeDigits();
    digits += String(d);
    digitsKind = kind;
    clearTimeout(digitsTimer);
    if (Number(digits) * 10 > n || digits.length >= String(n).length) takeDigits();
    else {
      say(`${kind} ${digits}… (another digit, or wait)`, "info", 1200);
      digitsTimer = setTimeout(takeDigits, 900);
    }
  }

  function takeDigits() {
    clearTimeout(digitsTimer);
    const v = Number(digits), kind = digitsKind;
    digits = ""; digitsKind = null;
    if (!sample || !kind) return;
    if (v >= 1) choose(kind, v - 1);
  }

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (!sample) {
      if (e.key === "u" || e.key === "U") { e.preventDefault(); undo(); }  // also from the "all done" page
      return;
    }
    const digit = digitOf(e.code);
    if (digit === null && digits) takeDigits();  // a pending number is complete before anything else
    if (zoomAt !== null) {
      const n = sample.candidates.length;
      if (e.key === "Escape" || e.key === "z" || e.key === "Z") { e.preventDefault(); closeZoom(); return; }
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        e.preventDefault();
        const step = e.key === "ArrowRight" ? 1 : -1;
        zoomAt = ((zoomAt + 1 + step + n + 1) % (n + 1)) - 1;  // cycles source, 1..n
        drawZoom();
        return;
      }
      // Labelling keys work while zoomed; Enter / s would act on a page the annotator cannot see.
      const labelling = digit !== null || ZOOM_KEYS.includes(e.key);
      if (!labelling) { e.preventDefault(); return; }
    }
    if (digit !== null) {
      e.preventDefault();
      typeDigit(digit, e.shiftKey ? "worst" : "best");
      return;
    }
    switch (e.key) {
      case "ArrowDown": case "j": move(1); break;
      case "ArrowUp": case "k": move(-1); break;
      case "n": case "N": noDifference(); break;
      case "Backspace": case "Delete": clearFocused(); break;
      case "Enter": submit(); break;
      case "s": case "S": skip(); break;
      case "u": case "U": undo(); break;
      case "z": case "Z": openZoom(0); break;
      case "o": case "O":
        outlineCandidates = !outlineCandidates;
        drawCandidates();
        if (zoomAt !== null) drawZoom();
        say(`Mask outline on candidates ${outlineCandidates ? "on" : "off"}.`, "info");
        break;
      default: return;
    }
    e.preventDefault();
  });

  // ------------------------------------------------------------------------------------------
  // Wiring
  // ------------------------------------------------------------------------------------------
  function say(text, kind = "info", ms = 3500) {
    const m = $("message");
    m.textContent = text;
    m.className = kind;
    clearTimeout(messageTimer);
    if (ms) messageTimer = setTimeout(() => { m.textContent = ""; m.className = ""; }, ms);
  }

  $("submit").addEventListener("click", (e) => { e.currentTarget.blur(); submit(); });
  $("skip").addEventListener("click", (e) => { e.currentTarget.blur(); skip(); });
  $("undo").addEventListener("click", (e) => { e.currentTarget.blur(); undo(); });
  $("source").addEventListener("click", () => openZoom(-1));
  $("zoom").addEventListener("click", closeZoom);
  loadState();
})();
