// The page's own script: upload a scan to POST /predict, show scan + segmentation with NiiVue (static/vendor),
// the legend (colours from GET /info, the same palette as `mlops predict --preview`), volumes, timing, download.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, nv: null, scan: null, seg: null, segUrl: null, token: sessionStorage.getItem("mlops-token") || "" };
window.mlopsPage = state; // for tests and the curious: what the page currently shows

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function setState(name) { document.body.dataset.state = name; }

function authHeaders() { return state.token ? { Authorization: "Bearer " + state.token } : {}; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  setState("error");
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

function setStatus(text, fraction) {
  $("status").textContent = text;
  const bar = $("progress");
  if (fraction === undefined) { bar.hidden = true; return; }
  bar.hidden = false;
  if (fraction === null) bar.removeAttribute("value"); else bar.value = fraction;
}

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

// The "detail" of a JSON error answer, else the status text.
async function detailOf(status, statusText, body) {
  let text = "";
  try { text = typeof body === "string" ? body : await body.text(); } catch (_) { /* no body */ }
  try {
    const detail = JSON.parse(text).detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  } catch (_) { /* not JSON */ }
  return text || statusText || "no answer";
}

function explain(err) {
  if (!(err instanceof ApiError)) return err.message || String(err);
  const hints = {
    401: "The service needs an access token: enter it above.",
    408: "The upload took too long.",
    413: "The scan is too large for this service.",
    503: "The service is busy or restarting; try again in a moment.",
  };
  return `Error ${err.status}: ${err.message}` + (hints[err.status] ? `\n${hints[err.status]}` : "");
}

async function loadInfo() {
  const resp = await fetch("info", { headers: authHeaders() });
  if (resp.status === 401) {
    $("token-box").hidden = false;
    throw new ApiError(401, await detailOf(resp.status, resp.statusText, resp));
  }
  if (!resp.ok) throw new ApiError(resp.status, await detailOf(resp.status, resp.statusText, resp));
  state.info = await resp.json();
  $("token-box").hidden = true;
  const info = state.info;
  const dice = info.training_dice ? ` · validation Dice ${info.training_dice.foreground_mean.toFixed(3)}` : "";
  $("model").textContent = `${info.dataset} · ${info.configuration || info.model} · folds ${info.folds.join(", ")} · ` +
    `${info.device} (${info.backend}, ${info.precision})${dice}`;
  const warnings = info.warnings || [];
  $("model-warning").textContent = warnings.map((w) => `Warning: ${w}`).join("\n");
  $("model-warning").hidden = warnings.length === 0;
  $("pacs-box").hidden = !info.pacs;
  const legend = $("legend");
  legend.replaceChildren();
  for (const [id, name] of Object.entries(info.labels)) {
    if (id === "0") continue;
    const li = document.createElement("li");
    li.dataset.label = id;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = info.colours[id];
    li.append(sw, `${id} ${name}`);
    legend.append(li);
  }
}

// NiiVue's label colour table built from /info: background transparent, each label opaque in its colour.
function labelColormap() {
  const ids = Object.keys(state.info.labels).map(Number).sort((a, b) => a - b);
  const cm = { R: [], G: [], B: [], A: [], I: [], labels: [] };
  for (let v = 0; v <= Math.max(...ids); v++) {
    const hex = state.info.colours[String(v)];
    const [r, g, b] = hex ? hexToRgb(hex) : [0, 0, 0];
    cm.R.push(r); cm.G.push(g); cm.B.push(b); cm.A.push(hex ? 255 : 0); cm.I.push(v);
    cm.labels.push(state.info.labels[String(v)] || "");
  }
  return cm;
}

async function initViewer() {
  const nv = new niivue.Niivue({
    backColor: [0.08, 0.086, 0.11, 1],
    show3Dcrosshair: true,
    crosshairColor: [1, 1, 1, 0.45], // white, see-through: never mistaken for a label colour
    crosshairWidth: 0.25, // mm: a hairline; NiiVue's default (1 voxel) is a 12 px bar on a small scan
    crosshairWidthUnit: "mm",
    multiplanarLayout: niivue.MULTIPLANAR_TYPE.GRID, // 2 x 2 panes: every pane whole at any window shape
    isColorbar: false,
    multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS,
    dragAndDropEnabled: false,
    loadingText: "", // the status line says what is happening; an empty viewer stays empty
  });
  await nv.attachToCanvas($("viewer"));
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.setInterpolation(true); // nearest neighbour: labels keep their exact colours
  state.nv = nv;
}

function clearViewer() {
  if (!state.nv) return;
  for (const v of [...state.nv.volumes]) state.nv.removeVolume(v);
  delete document.body.dataset.centreVoxel;
  state.scan = state.seg = null;
}

async function showScan(file) {
  if (!state.nv) return;
  clearViewer();
  const name = /\.nii(\.gz)?$/i.test(file.name) ? file.name : "scan.nii.gz";
  state.scan = await niivue.NVImage.loadFromFile({ file: new File([file], name), name, colormap: "gray" });
  state.nv.addVolume(state.scan);
}

async function showSegmentation(blob) {
  if (!state.nv) return;
  const seg = await niivue.NVImage.loadFromFile({ file: new File([blob], "segmentation.nii.gz"), name: "segmentation.nii.gz" });
  seg.setColormapLabel(labelColormap());
  seg.opacity = Number($("opacity").value) / 100;
  state.nv.addVolume(seg);
  state.seg = seg;
  const centre = foregroundCentre(seg);
  if (centre) {
    // Open where the segmentation is (as `mlops predict --preview` does): a small structure off the volume's middle
    // would otherwise be in none of the three slices shown.
    document.body.dataset.centreVoxel = centre.join(",");
    state.nv.scene.crosshairPos = state.nv.mm2frac(voxelToMM(seg.hdr.affine, centre));
  }
  state.nv.updateGLVolume();
}

/** The foreground's centre of mass in the file's own voxel indices (rounded); null when nothing was segmented. */
function foregroundCentre(seg) {
  const [, nx, ny, nz] = seg.hdr.dims;
  const img = seg.img;
  let n = 0, si = 0, sj = 0, sk = 0;
  for (let k = 0, p = 0; k < nz; k++) {
    for (let j = 0; j < ny; j++) {
      for (let i = 0; i < nx; i++, p++) {
        if (img[p] > 0) { n++; si += i; sj += j; sk += k; }
      }
    }
  }
  return n ? [si, sj, sk].map((s) => Math.round(s / n)) : null;
}

function voxelToMM(affine, [i, j, k]) {
  return [0, 1, 2].map((r) => affine[r][0] * i + affine[r][1] * j + affine[r][2] * k + affine[r][3]);
}

function upload(file) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "predict");
    xhr.responseType = "blob";
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    let timer = null;
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) setStatus(`Uploading… ${Math.round((100 * e.loaded) / e.total)}%`, e.loaded / e.total);
    };
    xhr.upload.onload = () => {
      setState("segmenting");
      const t0 = performance.now();
      const tick = () => setStatus(`Segmenting… ${((performance.now() - t0) / 1000).toFixed(1)} s`, null);
      tick();
      timer = setInterval(tick, 200);
    };
    xhr.onload = async () => {
      clearInterval(timer);
      if (xhr.status !== 200) {
        reject(new ApiError(xhr.status, await detailOf(xhr.status, xhr.statusText, xhr.response)));
        return;
      }
      const disposition = xhr.getResponseHeader("Content-Disposition") || "";
      const match = /filename="([^"]+)"/.exec(disposition);
      resolve({
        blob: xhr.response,
        volumes: JSON.parse(xhr.getResponseHeader("X-Label-Volumes-mm3") || "{}"),
        seconds: parseFloat(xhr.getResponseHeader("X-Inference-Seconds")),
        filename: match ? match[1] : "segmentation.nii.gz",
      });
    };
    xhr.onerror = () => { clearInterval(timer); reject(new Error("The service could not be reached.")); };
    xhr.send(form);
  });
}

function showResult(result) {
  const body = $("volumes").querySelector("tbody");
  body.replaceChildren();
  for (const [id, name] of Object.entries(state.info.labels)) {
    if (id === "0" || !(name in result.volumes)) continue;
    const mm3 = result.volumes[name];
    const tr = document.createElement("tr");
    tr.dataset.label = name;
    tr.dataset.mm3 = String(mm3);
    const cells = [name, mm3.toFixed(1), (mm3 / 1000).toFixed(3)];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tr.firstChild.prepend(Object.assign(document.createElement("span"), { className: "swatch" }), " ");
    tr.firstChild.firstChild.style.background = state.info.colours[id];
    body.append(tr);
  }
  $("seconds").textContent = result.seconds.toFixed(2);
  $("result-model").textContent = state.info.model;
  $("result-folds").textContent = state.info.folds.join(", ");
  if (state.segUrl) URL.revokeObjectURL(state.segUrl);
  state.segUrl = URL.createObjectURL(result.blob);
  $("download").href = state.segUrl;
  $("download").download = result.filename;
  $("result").hidden = false;
}

const UID = /^[0-9][0-9.]{0,63}$/;

/** A series of the service's PACS: fetched as the NIfTI volume the model sees, then shown and segmented like a
 * chosen file; the SEG can then be stored back (POST /dicomweb/segment). */
async function openFromPacs() {
  const study = $("pacs-study").value.trim();
  const series = $("pacs-series").value.trim();
  clearError();
  if (!UID.test(study) || !UID.test(series)) {
    showError("A StudyInstanceUID and a SeriesInstanceUID are digits and dots (at most 64 characters).");
    return;
  }
  setState("uploading");
  setStatus("Reading the series from the PACS…", null);
  try {
    if (!state.info) await loadInfo();
    const resp = await fetch(`dicomweb/studies/${study}/series/${series}/volume`, { headers: authHeaders() });
    if (!resp.ok) throw new ApiError(resp.status, await detailOf(resp.status, resp.statusText, resp));
    state.pacsSeries = { study, series };
    await handleFile(new File([await resp.blob()], `${series}.nii.gz`), true);
  } catch (err) {
    setStatus("");
    showError(explain(err));
  }
}

async function storeSeg() {
  const { study, series } = state.pacsSeries || {};
  if (!study) return;
  $("pacs-store").disabled = true;
  setStatus("Segmenting and storing the DICOM SEG in the PACS…", null);
  try {
    const resp = await fetch("dicomweb/segment", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ study, series, store: true }),
    });
    if (!resp.ok) throw new ApiError(resp.status, await detailOf(resp.status, resp.statusText, resp));
    const body = await resp.json();
    $("pacs-stored").textContent = `Stored: SEG series ${body.seg_series} in study ${body.study}.`;
    $("pacs-stored").hidden = false;
    setStatus("Stored in the PACS.");
  } catch (err) {
    setStatus("");
    showError(explain(err));
  } finally {
    $("pacs-store").disabled = false;
  }
}

async function handleFile(file, fromPacs = false) {
  clearError();
  $("result").hidden = true;
  $("pacs-stored").hidden = true;
  $("pacs-store").hidden = !fromPacs;
  if (!fromPacs) state.pacsSeries = null;
  if (!/\.nii(\.gz)?$/i.test(file.name)) {
    showError(`${file.name}: expected a .nii or .nii.gz file`);
    return;
  }
  setState("uploading");
  setStatus("Uploading… 0%", 0);
  try {
    if (!state.info) await loadInfo();
    await showScan(file).catch((e) => console.warn("scan not displayed", e));
    const result = await upload(file);
    setStatus("Displaying…", null);
    await showSegmentation(result.blob).catch((e) => console.warn("segmentation not displayed", e));
    showResult(result);
    setStatus(`Done: ${file.name} segmented in ${result.seconds.toFixed(2)} s.`);
    $("viewer-hint").hidden = true;
    setState("done");
  } catch (err) {
    setStatus("");
    showError(explain(err));
  }
}

function wire() {
  $("file-input").addEventListener("change", (e) => { if (e.target.files.length) handleFile(e.target.files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) handleFile(e.dataTransfer.files[0]);
  });
  $("opacity").addEventListener("input", (e) => {
    $("opacity-value").textContent = `${e.target.value}%`;
    if (state.nv && state.seg) state.nv.setOpacity(state.nv.volumes.indexOf(state.seg), Number(e.target.value) / 100);
  });
  $("pacs-open").addEventListener("click", openFromPacs);
  $("pacs-store").addEventListener("click", storeSeg);
  $("token-save").addEventListener("click", async () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("mlops-token", state.token);
    clearError();
    try { await loadInfo(); setState("idle"); } catch (err) { showError(explain(err)); }
  });
}

async function main() {
  wire();
  try {
    await initViewer();
  } catch (err) {
    showError(`The viewer cannot start in this browser (WebGL2 needed): ${err.message || err}. Volumes still work.`);
  }
  try {
    await loadInfo();
    if (document.body.dataset.state !== "error") setState("idle");
  } catch (err) {
    showError(explain(err));
  }
}

main();
