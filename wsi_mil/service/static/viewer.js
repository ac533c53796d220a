// The job viewer: the slide via Deep Zoom, the attention heatmap as an overlay with an opacity
// slider and a colour legend, the prediction and the top tiles. Every data request carries the API key when the page
// was opened as .../viewer#api_key=KEY (URL fragments are never sent to the server).
"use strict";

(function () {
  const root = document.getElementById("viewer-root");
  const jobId = root.dataset.jobId;
  const osdPrefix = root.dataset.osdPrefix;
  const base = "/v1/jobs/" + jobId;
  const apiKey = new URLSearchParams(window.location.hash.slice(1)).get("api_key");
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  const state = { slideLoaded: false, overlayLoaded: false, legendLoaded: false, topTilesLoaded: false, error: null };
  const SCALE_NAMES = {
    relative: "× the slide's mean score (tiles at or below it stay uncoloured)",
    percentile: "rank within the slide",
    minmax: "the slide's lowest to highest score",
    raw: "the score itself",
  };
  window.wsiViewerState = state;
  let viewer = null;
  let overlay = null;
  let overlayUrl = null;
  let job = null;

  function setStatus(text, isError) {
    const status = document.getElementById("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
    if (isError) state.error = text;
  }

  async function fetchOk(url) {
    const response = await fetch(url, { headers: headers });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail; } catch (ignored) { /* not JSON */ }
      throw new Error(response.status + ": " + detail);
    }
    return response;
  }

  async function blobUrl(url) {
    return URL.createObjectURL(await (await fetchOk(url)).blob());
  }

  // Level-0 pixels -> OpenSeadragon viewport units (the Deep Zoom image spans `bounds`, width 1).
  function viewportRect(x, y, w, h) {
    const [bx, by, bw] = job.result.bounds;
    return new OpenSeadragon.Rect((x - bx) / bw, (y - by) / bw, w / bw, h / bw);
  }

  function showPrediction(result) {
    document.getElementById("predicted-class").textContent = result.predicted_class;
    const body = document.querySelector("#probabilities tbody");
    body.replaceChildren();
    for (const name of result.class_names) {
      const row = body.insertRow();
      row.insertCell().textContent = name;
      row.insertCell().textContent = result.probabilities[name].toFixed(4);
    }
    document.getElementById("slide-meta").textContent =
      result.n_tiles + " tiles of " + result.tile_size_level0 + " px (level 0), slide " +
      result.slide_width + "×" + result.slide_height + (result.mpp ? ", " + result.mpp.toFixed(3) + " µm/px" : "");
    document.getElementById("prediction").hidden = false;
    const classChoice = document.getElementById("class-index");
    const perClass = result.maps.some((m) => ["class_attention", "branch_attention", "tile_probability"].includes(m));
    if (perClass) {
      result.class_names.forEach((name, index) => classChoice.add(new Option("class " + name, String(index))));
      document.getElementById("class-choice").hidden = false;
    }
  }

  function scoreQuery(extra) {
    const params = new URLSearchParams({ scale: document.getElementById("scale").value, ...extra });
    const classIndex = document.getElementById("class-index").value;
    if (classIndex !== "") params.set("class_index", classIndex);
    return params.toString();
  }

  function overlayQuery() {
    return scoreQuery({ background: "none", alpha: "1" });
  }

  // The colour bar of the overlay: its colours, the scale's value at each tick and the score there.
  async function loadLegend() {
    state.legendLoaded = false;
    const legend = await (await fetchOk(base + "/heatmap-legend?" + scoreQuery({}))).json();
    document.getElementById("legend-bar").style.backgroundImage = "linear-gradient(to right, " + legend.colors.join(", ") + ")";
    const ticks = document.getElementById("legend-ticks");
    ticks.replaceChildren();
    const showScore = legend.scale === "relative" || legend.scale === "percentile";
    for (const tick of legend.ticks) {
      const item = document.createElement("li");
      item.style.left = (tick.position * 100) + "%";
      const label = document.createElement("span");
      label.className = "tick-label";
      label.textContent = tick.label;
      item.append(label);
      if (showScore) {
        const value = document.createElement("span");
        value.className = "tick-value";
        value.textContent = tick.value.toPrecision(2);
        item.append(value);
      }
      ticks.append(item);
    }
    document.getElementById("legend-caption").textContent =
      legend.score + ", " + SCALE_NAMES[legend.scale] + (showScore ? "; the score is under each tick" : "");
    document.getElementById("legend").hidden = false;
    state.legendLoaded = true;
  }

  function showOverlay() {
    loadOverlay().catch((err) => setStatus("overlay failed: " + err.message, true));
    loadLegend().catch((err) => setStatus("legend failed: " + err.message, true));
  }

  async function loadOverlay() {
    state.overlayLoaded = false;
    const url = await blobUrl(base + "/heatmap.png?" + overlayQuery());
    const r = job.result;
    const rect = viewportRect(0, 0, r.slide_width, r.slide_height);
    viewer.addTiledImage({
      tileSource: { type: "image", url: url, buildPyramid: false },
      x: rect.x,
      y: rect.y,
      width: rect.width,
      opacity: Number(document.getElementById("opacity").value),
      success: (event) => {
        if (overlay) viewer.world.removeItem(overlay);
        if (overlayUrl) URL.revokeObjectURL(overlayUrl);
        overlay = event.item;
        overlayUrl = url;
        const markLoaded = () => { state.overlayLoaded = true; };
        if (overlay.getFullyLoaded()) markLoaded();
        else overlay.addOnceHandler("fully-loaded-change", markLoaded);
      },
      error: (event) => setStatus("overlay failed: " + event.message, true),
    });
  }

  async function loadTopTiles() {
    const params = new URLSearchParams({ k: "8" });
    const classIndex = document.getElementById("class-index").value;
    if (classIndex !== "") params.set("class_index", classIndex);
    const listing = await (await fetchOk(base + "/top-tiles?" + params)).json();
    const list = document.getElementById("top-tiles");
    list.replaceChildren();
    for (const tile of listing.data) {
      const item = document.createElement("li");
      const image = document.createElement("img");
      image.alt = "tile " + tile.index;
      image.src = await blobUrl(tile.url + (tile.url.includes("?") ? "&" : "?") + "size=128");
      item.append(image, document.createTextNode(listing.score + " " + tile.score.toPrecision(3) + " at (" + tile.x + ", " + tile.y + ")"));
      item.addEventListener("click", () => viewer.viewport.fitBounds(viewportRect(tile.x, tile.y, tile.size, tile.size)));
      list.append(item);
    }
    document.getElementById("top-tiles-section").hidden = false;
    state.topTilesLoaded = true;
  }

  function openSlide() {
    viewer = OpenSeadragon({
      id: "slide-view",
      prefixUrl: osdPrefix + "images/",
      tileSources: base + "/dzi.dzi",
      drawer: "canvas",
      showNavigator: true,
      loadTilesWithAjax: Boolean(apiKey),
      ajaxHeaders: headers,
      crossOriginPolicy: "Anonymous",
    });
    viewer.addOnceHandler("open", () => {
      const slide = viewer.world.getItemAt(0);
      const markLoaded = () => { state.slideLoaded = true; };
      if (slide.getFullyLoaded()) markLoaded();
      else slide.addOnceHandler("fully-loaded-change", markLoaded);
      showOverlay();
    });
    viewer.addHandler("open-failed", (event) => setStatus("slide failed to open: " + event.message, true));
    document.getElementById("opacity").addEventListener("input", (event) => {
      if (overlay) overlay.setOpacity(Number(event.target.value));
    });
    const reload = () => {
      showOverlay();
      loadTopTiles().catch((err) => setStatus("top tiles failed: " + err.message, true));
    };
    document.getElementById("scale").addEventListener("change", showOverlay);
    document.getElementById("class-index").addEventListener("change", reload);
    document.getElementById("overlay-controls").hidden = false;
  }

  async function start() {
    if (typeof OpenSeadragon === "undefined") {
      setStatus("OpenSeadragon did not load (run `npm ci` at the repository root, or allow the CDN)", true);
      return;
    }
    try {
      job = await (await fetchOk(base)).json();
    } catch (err) {
      setStatus("cannot read job " + jobId + ": " + err.message, true);
      return;
    }
    if (job.state === "queued" || job.state === "running") {
      setStatus("job " + job.state + " (" + Math.round(job.progress * 100) + "%, " + job.stage + ")…");
      window.setTimeout(start, 2000);
      return;
    }
    if (job.state !== "done") {
      setStatus("job " + job.state + (job.error ? ": " + job.error : ""), true);
      return;
    }
    setStatus("model " + job.model + " · slide " + job.slide_name);
    showPrediction(job.result);
    openSlide();
    loadTopTiles().catch((err) => setStatus("top tiles failed: " + err.message, true));
  }

  start();
})();
