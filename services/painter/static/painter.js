// The mask painter: paint over the image; the painted area (white in the mask) is what gets repainted.
// The mask is kept at the image's own resolution in an offscreen canvas; what you see is scaled.
(() => {
  "use strict";
  const app = document.getElementById("app");
  const base = location.pathname.replace(/\/$/, "");
  const imageCanvas = document.getElementById("image");
  const overlay = document.getElementById("overlay");
  const frame = document.getElementById("frame");
  const stage = document.getElementById("stage");
  const sizeInput = document.getElementById("size");
  const status = document.getElementById("status");
  const submit = document.getElementById("submit");
  const coverageText = document.getElementById("coverage");
  const mask = document.createElement("canvas"); // white = repaint, transparent = keep
  const tint = "rgba(255, 48, 96, 0.55)";
  const history = [], future = [];
  let tool = "brush", zoom = 1, drawing = null, width = 0, height = 0;

  const mctx = () => mask.getContext("2d", { willReadFrequently: true });

  function setStatus(text, kind) { status.textContent = text; status.className = kind || ""; }

  function render() {
    const ctx = overlay.getContext("2d");
    ctx.globalCompositeOperation = "source-over";
    ctx.clearRect(0, 0, width, height);
    ctx.drawImage(mask, 0, 0);
    ctx.globalCompositeOperation = "source-in";
    ctx.fillStyle = tint;
    ctx.fillRect(0, 0, width, height);
    ctx.globalCompositeOperation = "source-over";
    updateCoverage();
  }

  function updateCoverage() {
    const data = mctx().getImageData(0, 0, width, height).data;
    let painted = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 127) painted++;
    const share = painted / (width * height);
    coverageText.textContent = painted ? `${(share * 100).toFixed(1)}% of the image will be repainted`
                                       : "Nothing painted yet";
    submit.disabled = painted === 0 || share >= 0.999;
  }

  function snapshot() {
    history.push(mctx().getImageData(0, 0, width, height));
    if (history.length > 40) history.shift();
    future.length = 0;
    syncHistoryButtons();
  }

  function syncHistoryButtons() {
    document.getElementById("undo").disabled = history.length === 0;
    document.getElementById("redo").disabled = future.length === 0;
  }

  function restore(from, to) {
    if (!from.length) return;
    to.push(mctx().getImageData(0, 0, width, height));
    mctx().putImageData(from.pop(), 0, 0);
    syncHistoryButtons();
    render();
  }

  function toImage(event) {
    const rect = overlay.getBoundingClientRect();
    return [(event.clientX - rect.left) * width / rect.width, (event.clientY - rect.top) * height / rect.height];
  }

  function stroke(from, to) {
    const ctx = mctx();
    ctx.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = "#fff";
    ctx.fillStyle = "#fff";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number(sizeInput.value);
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(to[0], to[1], ctx.lineWidth / 2, 0, Math.PI * 2);
    ctx.fill();
    ctx.globalCompositeOperation = "source-over";
  }

  overlay.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    overlay.setPointerCapture(event.pointerId);
    snapshot();
    const point = toImage(event);
    drawing = point;
    stroke(point, point);
    render();
  });
  overlay.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of events.length ? events : [event]) {
      const point = toImage(e);
      stroke(drawing, point);
      drawing = point;
    }
    render();
  });
  const end = () => { drawing = null; };
  overlay.addEventListener("pointerup", end);
  overlay.addEventListener("pointercancel", end);

  function setTool(name) {
    tool = name;
    for (const id of ["brush", "eraser"]) {
      const button = document.getElementById(id);
      button.classList.toggle("active", id === name);
      button.setAttribute("aria-pressed", String(id === name));
    }
  }

  function setZoom(value) {
    zoom = Math.min(8, Math.max(0.1, value));
    frame.style.width = `${width * zoom}px`;
    frame.style.height = `${height * zoom}px`;
    document.getElementById("zoom-out-label").textContent = `${Math.round(zoom * 100)}%`;
  }

  function fit() { setZoom(Math.min(1, (stage.clientWidth - 4) / width, (window.innerHeight * 0.68) / height)); }

  document.getElementById("brush").addEventListener("click", () => setTool("brush"));
  document.getElementById("eraser").addEventListener("click", () => setTool("eraser"));
  sizeInput.addEventListener("input", () => { document.getElementById("size-out").textContent = sizeInput.value; });
  document.getElementById("undo").addEventListener("click", () => restore(history, future));
  document.getElementById("redo").addEventListener("click", () => restore(future, history));
  document.getElementById("clear").addEventListener("click", () => {
    snapshot(); mctx().clearRect(0, 0, width, height); render();
  });
  document.getElementById("invert").addEventListener("click", () => {
    snapshot();
    const ctx = mctx();
    const pixels = ctx.getImageData(0, 0, width, height);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const painted = d[i + 3] > 127;
      d[i] = d[i + 1] = d[i + 2] = 255;
      d[i + 3] = painted ? 0 : 255;
    }
    ctx.putImageData(pixels, 0, 0);
    render();
  });
  document.getElementById("zoom-in").addEventListener("click", () => setZoom(zoom * 1.25));
  document.getElementById("zoom-out").addEventListener("click", () => setZoom(zoom / 1.25));
  document.getElementById("zoom-fit").addEventListener("click", fit);
  stage.addEventListener("wheel", (event) => {
    if (!event.ctrlKey) return;
    event.preventDefault();
    setZoom(zoom * (event.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "TEXTAREA") return;
    const key = event.key.toLowerCase();
    if ((event.ctrlKey || event.metaKey) && key === "z") { event.preventDefault(); restore(history, future); }
    else if ((event.ctrlKey || event.metaKey) && key === "y") { event.preventDefault(); restore(future, history); }
    else if (key === "b") setTool("brush");
    else if (key === "e") setTool("eraser");
  });

  function maskPng() {
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    ctx.drawImage(mask, 0, 0);
    return out.toDataURL("image/png");
  }

  document.getElementById("form").addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    setStatus("Sending…");
    try {
      const response = await fetch(`${base}/submit`, {
        method: "POST", headers: { "Content-Type": "application/json" }, credentials: "same-origin",
        body: JSON.stringify({ prompt: document.getElementById("prompt").value, mask: maskPng() }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
      setStatus(`Queued as job #${body.job_id}: the progress is in your Discord channel. You can close this page.`,
                "ok");
      app.dataset.jobId = String(body.job_id);
    } catch (error) {
      setStatus(error.message, "error");
      submit.disabled = false;
    }
  });

  const picture = new Image();
  picture.onload = () => {
    width = picture.naturalWidth;
    height = picture.naturalHeight;
    for (const canvas of [imageCanvas, overlay, mask]) { canvas.width = width; canvas.height = height; }
    imageCanvas.getContext("2d").drawImage(picture, 0, 0);
    sizeInput.max = String(Math.max(64, Math.round(Math.max(width, height) / 4)));
    sizeInput.value = String(Math.max(8, Math.round(Math.max(width, height) / 20)));
    document.getElementById("size-out").textContent = sizeInput.value;
    fit();
    render();
    app.dataset.ready = "1";
  };
  picture.onerror = () => setStatus("The image couldn't be loaded: the link may have expired.", "error");
  picture.src = `${base}/image`;
})();
