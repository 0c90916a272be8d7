// The page of `cryoem explore`: a WebGL latent scatter (regl-scatterplot) beside a molecular viewer (NGL).
// It talks to cryoem/explore/server.py; arrays arrive as little-endian float32 / uint32, never JSON.
// Bundled by scripts/build_explorer_js.sh into cryoem/explore/static/explorer.js (window.explorer: the page's API,
// used by the tests and handy in the browser console).
import KDBush from 'kdbush';
import * as NGL from 'ngl';
import createScatterplot from 'regl-scatterplot';

const $ = (id) => document.getElementById(id);
const VIRIDIS = ['#440154', '#482475', '#414487', '#355f8d', '#2a788e', '#21918c', '#22a884', '#44bf70',
  '#7ad151', '#bddf26', '#fde725'];
const CATEGORICAL = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
  '#bcbd22', '#17becf', '#393b79', '#e6550d', '#31a354', '#756bb1', '#636363', '#843c39', '#7b4173', '#3182bd',
  '#fd8d3c', '#74c476', '#9e9ac8', '#bdbdbd', '#ad494a', '#a55194', '#6baed6', '#fdae6b', '#a1d99b', '#cedb9c',
  '#e7969c', '#de9ed6', '#c6dbef', '#fdd0a2'];

const state = {
  meta: null, n: 0, xy: null, norm: null, column: null, selection: [], path: [], pathMode: false,
  lastModel: null, model: null, map: null, movie: null, ready: false, errors: [],
};
let scatter = null;
let stage = null;

// ----------------------------------------------------------------------------- server calls
async function call(url, options = {}) {
  const r = await fetch(url, options);
  if (!r.ok) {
    let msg = `${r.status}`;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}
const getJSON = async (url, o) => (await call(url, o)).json();
const getFloats = async (url) => new Float32Array(await (await call(url)).arrayBuffer());
const indexBody = (idx) => new Uint32Array(idx).buffer;

function status(text, isError = false) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
  if (isError) state.errors.push(text);
}

// ----------------------------------------------------------------------------- colour maps
function viridis(n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const t = (i / (n - 1)) * (VIRIDIS.length - 1);
    const k = Math.min(Math.floor(t), VIRIDIS.length - 2);
    const a = hexRgb(VIRIDIS[k]);
    const b = hexRgb(VIRIDIS[k + 1]);
    const f = t - k;
    out.push(rgbHex(a.map((v, j) => v + (b[j] - v) * f)));
  }
  return out;
}
const hexRgb = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
const rgbHex = (c) => `#${c.map((v) => Math.round(v).toString(16).padStart(2, '0')).join('')}`;

// ----------------------------------------------------------------------------- the scatter
function normalise(xy) {
  // (N, 2) interleaved -> x, y in [-0.95, 0.95] (regl-scatterplot draws normalised device coordinates)
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (let i = 0; i < xy.length; i += 2) {
    x0 = Math.min(x0, xy[i]); x1 = Math.max(x1, xy[i]);
    y0 = Math.min(y0, xy[i + 1]); y1 = Math.max(y1, xy[i + 1]);
  }
  const sx = 1.9 / ((x1 - x0) || 1);
  const sy = 1.9 / ((y1 - y0) || 1);
  return { x0, x1, y0, y1, sx, sy, toGl: (x, y) => [-0.95 + (x - x0) * sx, -0.95 + (y - y0) * sy] };
}

async function drawPoints() {
  // The points in GL coordinates and their spatial index are made once per axes and kept: a new colour only
  // re-uploads the values. regl-scatterplot would otherwise build the index from 10^6 little arrays in a worker,
  // which took over a second; built here from the typed arrays it takes a fraction of that.
  const col = state.column;
  if (!state.gl) state.gl = glPoints(state.xy, state.norm);
  const points = { x: state.gl.x, y: state.gl.y };
  if (col) points.valueA = col.draw;
  scatter.set(col ? { colorBy: 'valueA', pointColor: col.palette } : { colorBy: null, pointColor: '#3b6ea5' });
  if (state.timings) state.timings.preDraw = performance.now();
  await scatter.draw(points, {
    zDataType: col ? col.info.kind : undefined, select: state.selection, spatialIndex: state.gl.index,
  });
  drawCentres();
  state.drawn = scatter.get('points').length;
}

function glPoints(xy, norm) {
  // (N, 2) interleaved latent axes -> x, y float32 in GL coordinates and a KDBush index over them (node size 16,
  // as regl-scatterplot's own), returned as its ArrayBuffer
  const n = xy.length / 2;
  const x = new Float32Array(n);
  const y = new Float32Array(n);
  const index = new KDBush(n, 16);
  for (let i = 0; i < n; i++) {
    x[i] = -0.95 + (xy[2 * i] - norm.x0) * norm.sx;
    y[i] = -0.95 + (xy[2 * i + 1] - norm.y0) * norm.sy;
    index.add(x[i], y[i]);
  }
  index.finish();
  return { x, y, index: index.data };
}

function drawCentres() {
  // k-means centres (the mean position of each cluster's points on these axes) as small crosses
  const lines = [];
  const r = 0.025;
  for (const c of state.centres || []) {
    const [gx, gy] = state.norm.toGl(c.x, c.y);
    lines.push({ vertices: [[gx - r, gy - r], [gx + r, gy + r]], lineColor: [0.85, 0.1, 0.1, 1], lineWidth: 2 });
    lines.push({ vertices: [[gx - r, gy + r], [gx + r, gy - r]], lineColor: [0.85, 0.1, 0.1, 1], lineWidth: 2 });
  }
  lines.push(...state.path.map((i, k) => state.path[k + 1] === undefined ? null : {
    vertices: [state.norm.toGl(state.xy[2 * i], state.xy[2 * i + 1]),
      state.norm.toGl(state.xy[2 * state.path[k + 1]], state.xy[2 * state.path[k + 1] + 1])],
    lineColor: [0, 0, 0, 1], lineWidth: 3,
  }).filter(Boolean));
  scatter.drawAnnotations(lines);
}

async function loadAxes(name, prefetched = null) {
  const nonlinear = { umap: 'UMAP', tsne: 't-SNE' }[name];
  status(nonlinear ? `computing ${nonlinear} (once; kept in RUN/explore/${name}.npy)…` : `loading ${name}…`);
  state.xy = await (prefetched || getFloats(`api/embedding?axes=${encodeURIComponent(name)}`));
  state.gl = null;
  if (state.timings) state.timings.axesFetched = performance.now();
  state.norm = normalise(state.xy);
  state.centres = clusterCentres();
  const [a, b] = name.startsWith('pca:') ? name.slice(4).split(',') : ['1', '2'];
  const ev = state.meta.pca_explained;
  const label = (k) => name.startsWith('pca:') ? `PC${k} (${Math.round(100 * ev[k - 1])}%)` : `${nonlinear} ${k}`;
  $('xlabel').textContent = label(a);
  $('ylabel').textContent = label(b);
  await drawPoints();
  if (state.timings) state.timings.pointsDrawn = performance.now();
  drawDensity();
  status(`${state.n.toLocaleString()} particles`);
}

function clusterCentres() {
  if (!state.labels) return [];
  const k = state.meta.clusters.length;
  const sum = Array.from({ length: k }, () => [0, 0, 0]);
  for (let i = 0; i < state.n; i++) {
    const s = sum[state.labels[i]];
    s[0] += state.xy[2 * i]; s[1] += state.xy[2 * i + 1]; s[2] += 1;
  }
  return sum.map(([x, y, c]) => ({ x: x / (c || 1), y: y / (c || 1) }));
}

async function loadColumn(name, redraw = true, prefetched = null) {
  const r = await (prefetched || call(`api/column?name=${encodeURIComponent(name)}`));
  const values = new Float32Array(await r.arrayBuffer());
  const info = JSON.parse(r.headers.get('X-Column'));
  const draw = new Float32Array(values.length);
  let palette;
  if (info.kind === 'categorical') {
    draw.set(values);
    palette = info.categories.map((_, i) => CATEGORICAL[i % CATEGORICAL.length]);
  } else {
    const span = (info.hi - info.lo) || 1;
    for (let i = 0; i < values.length; i++) {
      const v = (values[i] - info.lo) / span;
      draw[i] = Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : 0;
    }
    palette = viridis(64);
  }
  state.column = { name, values, draw, info, palette };
  if (name === 'k-means cluster') state.labels = values;
  if (redraw) await drawPoints();
  drawLegend();
  drawHistogram();
}

// ----------------------------------------------------------------------------- histogram, density, legend
function drawLegend() {
  const col = state.column;
  const el = $('legend');
  if (col.info.kind === 'categorical') {
    el.innerHTML = col.info.categories.map((c, i) =>
      `<span class="chip"><i style="background:${col.palette[i]}"></i>${escapeHtml(String(c))}</span>`).join('');
  } else {
    el.innerHTML = `<div class="ramp" style="background:linear-gradient(to right,${VIRIDIS.join(',')})"></div>` +
      `<div class="ramp-labels"><span>${fmt(col.info.lo)}</span><span>${escapeHtml(col.name)}</span>` +
      `<span>${fmt(col.info.hi)}</span></div>`;
  }
}

function drawHistogram() {
  const col = state.column;
  const cv = $('hist');
  const g = cv.getContext('2d');
  g.clearRect(0, 0, cv.width, cv.height);
  const cat = col.info.kind === 'categorical';
  const bins = cat ? col.info.categories.length : 40;
  const counts = new Float64Array(bins);
  for (let i = 0; i < col.draw.length; i++) {
    counts[cat ? col.draw[i] : Math.min(bins - 1, Math.floor(col.draw[i] * bins))] += 1;
  }
  const max = Math.max(...counts) || 1;
  const w = cv.width / bins;
  for (let b = 0; b < bins; b++) {
    g.fillStyle = cat ? col.palette[b] : col.palette[Math.floor((b / (bins - 1)) * (col.palette.length - 1))];
    const h = (counts[b] / max) * (cv.height - 14);
    g.fillRect(b * w + 0.5, cv.height - 12 - h, Math.max(1, w - 1), h);
  }
  g.fillStyle = '#444';
  g.font = '10px sans-serif';
  g.fillText(`histogram of ${col.name}`, 2, cv.height - 2);
}

function drawDensity() {
  // a 2-D histogram of the points on the current axes, log counts, dark = dense
  const cv = $('density');
  const g = cv.getContext('2d');
  const nb = 64;
  const counts = new Float64Array(nb * nb);
  for (let i = 0; i < state.n; i++) {
    const [gx, gy] = state.norm.toGl(state.xy[2 * i], state.xy[2 * i + 1]);
    const bx = Math.min(nb - 1, Math.floor(((gx + 0.95) / 1.9) * nb));
    const by = Math.min(nb - 1, Math.floor(((gy + 0.95) / 1.9) * nb));
    counts[(nb - 1 - by) * nb + bx] += 1;
  }
  const max = Math.log1p(Math.max(...counts)) || 1;
  const img = g.createImageData(nb, nb);
  const pal = viridis(256).map(hexRgb);
  for (let k = 0; k < nb * nb; k++) {
    const c = counts[k] ? pal[Math.floor((Math.log1p(counts[k]) / max) * 255)] : [255, 255, 255];
    img.data.set([...c, 255], 4 * k);
  }
  const off = document.createElement('canvas');
  off.width = nb; off.height = nb;
  off.getContext('2d').putImageData(img, 0, 0);
  g.imageSmoothingEnabled = false;
  g.clearRect(0, 0, cv.width, cv.height);
  g.drawImage(off, 0, 0, cv.width, cv.height - 12);
  g.fillStyle = '#444';
  g.font = '10px sans-serif';
  g.fillText('density (log counts)', 2, cv.height - 2);
}

// ----------------------------------------------------------------------------- the molecular viewer
async function showModel(query, label) {
  status(`decoding ${label}…`);
  const r = await call(query.body ? 'api/mean' : `api/model?${query}`,
    query.body ? { method: 'POST', body: query.body } : {});
  const text = await r.text();
  await showPdb(text, label);
  state.modelQuery = query.body ? null : query; // a mean model has no single latent, so no map
  await showMap();
  status(`${label}: ${state.lastModel.atoms} atoms, largest displacement ${fmt(state.lastModel.maxDisplacement)} Å`);
}

async function showPdb(text, label, asTrajectory = false) {
  stopMovie();
  const bfac = pdbBfactors(text);
  const maxD = Math.max(0.5, ...bfac);
  const comp = await stage.loadFile(new Blob([text], { type: 'text/plain' }),
    { ext: 'pdb', name: label, asTrajectory });
  const first = !state.model;
  if (state.model) stage.removeComponent(state.model);
  state.model = comp;
  const caOnly = comp.structure.atomCount <= 1.05 * comp.structure.residueCount;
  comp.addRepresentation(caOnly ? 'backbone' : 'cartoon', {
    colorScheme: 'bfactor', colorScale: 'RdYlBu', colorReverse: true, colorDomain: [0, maxD],
    radiusScale: caOnly ? 1.2 : 1.0,
  });
  if (first) comp.autoView();
  state.lastModel = { label, atoms: comp.structure.atomCount, maxDisplacement: maxD,
    models: (text.match(/^MODEL /gm) || []).length || 1 };
  $('model-label').textContent = label;
  $('disp-max').textContent = `${fmt(maxD)} Å`;
  return comp;
}

function pdbBfactors(text) {
  // B column (61-66) of the first model's ATOM records: the displacement from the starting model, Å
  const out = [];
  for (const line of text.split('\n')) {
    if (line.startsWith('ENDMDL')) break;
    if (line.startsWith('ATOM')) out.push(parseFloat(line.slice(60, 66)));
  }
  return out;
}

async function showMap() {
  if (state.map) { stage.removeComponent(state.map); state.map = null; }
  if (!$('show-map').checked || !state.modelQuery) return;
  const buf = await (await call(`api/map?${state.modelQuery}`)).arrayBuffer();
  state.map = await stage.loadFile(new Blob([buf]), { ext: 'mrc', name: 'map' });
  state.map.addRepresentation('surface', {
    isolevelType: 'sigma', isolevel: parseFloat($('level').value), opacity: 0.25, color: '#8899bb',
    side: 'front', depthWrite: false,
  });
}

function setLevel() {
  $('level-value').textContent = `${$('level').value} σ`;
  if (state.map) state.map.eachRepresentation((r) => r.setParameters({ isolevel: parseFloat($('level').value) }));
}

// ----------------------------------------------------------------------------- selection
async function onSelect({ points }) {
  if (points.length === 1) {
    const i = points[0];
    if (state.pathMode) addPathPoint(i);
    state.selection = [];
    updateSelection();
    await showModel(`particle=${i}`, `particle ${i}`);
    return;
  }
  state.selection = Array.from(points);
  updateSelection();
  if (points.length) await showModel({ body: indexBody(state.selection) }, `mean of ${points.length} selected`);
}

function updateSelection() {
  const k = state.selection.length;
  $('sel-count').textContent = k ? `${k.toLocaleString()} particles selected` :
    'none: shift-drag (or the lasso / box buttons) to select';
  $('sel-save').disabled = !k;
}

async function saveSelection(name) {
  name = name || $('sel-name').value.trim();
  if (!state.selection.length) throw new Error('nothing selected');
  const rec = await getJSON(`api/selections?name=${encodeURIComponent(name)}`,
    { method: 'POST', body: indexBody(state.selection) });
  status(`saved ${rec.count} particles as ${rec.subset}`);
  await listSelections();
  return rec;
}

async function listSelections() {
  const sels = await getJSON('api/selections');
  $('sel-list').innerHTML = sels.map((s) => `<li><b>${escapeHtml(s.name)}</b> · ${s.count.toLocaleString()} ` +
    `<a href="run/${s.subset}" download>${escapeHtml(s.subset.split('/').pop())}</a> ` +
    `<a href="run/${s.indices}" download>.npy</a> <button data-sel="${escapeHtml(s.name)}">show</button></li>`)
    .join('') || '<li class="muted">no saved selections yet</li>';
  for (const b of $('sel-list').querySelectorAll('button')) b.onclick = () => showSelection(b.dataset.sel);
  return sels;
}

async function showSelection(name) {
  const idx = new Uint32Array(await (await call(`api/selections/${encodeURIComponent(name)}`)).arrayBuffer());
  scatter.select(Array.from(idx));
}

// ----------------------------------------------------------------------------- paths and movies
function addPathPoint(i) {
  state.path.push(i);
  $('path-points').textContent = `path through particles ${state.path.join(' → ')}`;
  $('path-make').disabled = state.path.length < 2;
  drawCentres();
}

function clearPath() {
  state.path = [];
  $('path-points').textContent = 'click 2 or more points in path mode, or use a PC';
  $('path-make').disabled = true;
  drawCentres();
}

async function makePath(req) {
  status('decoding the path (models and maps)…');
  req.frames = parseInt($('frames').value, 10);
  const rec = await getJSON('api/path', { method: 'POST', body: JSON.stringify(req) });
  await playPath(rec);
  await listPaths();
  return rec;
}

async function playPath(rec) {
  const text = await (await call(`run/${rec.pdb}`)).text();
  state.modelQuery = null; // the path's maps are downloads (a series), not the viewer's surface
  await showMap();
  const comp = await showPdb(text, `path ${rec.name}`, true);
  const traj = comp.addTrajectory();
  const frames = state.lastModel.models;
  let f = 0;
  state.movie = { name: rec.name, frames, frame: 0, timer: null, traj };
  const step = () => {
    traj.trajectory.setFrame(f);
    state.movie.frame = f;
    $('frame').textContent = `frame ${f + 1}/${frames}`;
    f = (f + 1) % frames;
  };
  step();
  state.movie.timer = setInterval(step, 120);
  $('play').disabled = false;
  $('play').textContent = 'Pause';
  $('path-links').innerHTML = `Downloads: <a href="run/${rec.pdb}" download>path.pdb</a> (${frames} models) · ` +
    `<a href="run/${rec.cxc}" download>path.cxc</a> (ChimeraX) · ` +
    rec.maps.map((m, k) => `<a href="run/${m}" download>${k === 0 ? 'maps: ' : ''}${k}</a>`).join(' ');
  status(`path ${rec.name}: ${frames} frames; atoms coloured by their largest displacement along it`);
}

function stopMovie() {
  if (state.movie && state.movie.timer) clearInterval(state.movie.timer);
  if (state.movie) state.movie.timer = null;
  $('play').textContent = 'Play';
}

function togglePlay() {
  const m = state.movie;
  if (!m) return;
  if (m.timer) { stopMovie(); return; }
  let f = m.frame;
  m.timer = setInterval(() => {
    f = (f + 1) % m.frames;
    m.traj.trajectory.setFrame(f);
    m.frame = f;
    $('frame').textContent = `frame ${f + 1}/${m.frames}`;
  }, 120);
  $('play').textContent = 'Pause';
}

async function listPaths() {
  const meta = await getJSON('api/meta');
  $('path-list').innerHTML = meta.paths.map((p) => `<li>${escapeHtml(p.name)} ` +
    `<a href="run/${p.pdb}" download>pdb</a> <a href="run/${p.cxc}" download>cxc</a> ` +
    `<button data-path="${escapeHtml(p.name)}">play</button></li>`).join('');
  for (const b of $('path-list').querySelectorAll('button')) {
    b.onclick = () => playPath(meta.paths.find((p) => p.name === b.dataset.path));
  }
}

// ----------------------------------------------------------------------------- the page's API (tests, console)
function pointToScreen(i) {
  // client (CSS px) coordinates of particle i on the canvas
  return dataToScreen(state.xy[2 * i], state.xy[2 * i + 1]);
}

function dataToScreen(x, y) {
  // client (CSS px) coordinates of the point (x, y) of the current axes, through the camera's view matrix
  const [gx, gy] = state.norm.toGl(x, y);
  const v = scatter.get('cameraView');
  const px = v[0] * gx + v[4] * gy + v[12];
  const py = v[1] * gx + v[5] * gy + v[13];
  const rect = $('scatter').getBoundingClientRect();
  const sx = px / (rect.width / rect.height); // the projection divides x by the view's aspect ratio
  const sy = py;
  return [rect.left + ((sx + 1) / 2) * rect.width, rect.top + ((1 - sy) / 2) * rect.height];
}

function lasso(polygon) {
  // select the points inside a polygon given in the current axes' data coordinates, as a drawn lasso would
  scatter.lassoSelect(polygon.map(([x, y]) => state.norm.toGl(x, y)), { isGl: true });
}

// ----------------------------------------------------------------------------- start
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}
const fmt = (v) => (Math.abs(v) >= 1000 ? v.toFixed(0) : v.toPrecision(3));

function setMode(mode) {
  state.pathMode = mode === 'path';
  scatter.set({ mouseMode: mode === 'lasso' || mode === 'box' ? 'lasso' : 'panZoom',
    lassoType: mode === 'box' ? 'rectangle' : 'freeform' });
  for (const b of document.querySelectorAll('[data-mode]')) b.classList.toggle('on', b.dataset.mode === mode);
}

function wire() {
  $('axes').onchange = () => loadAxes($('axes').value).catch((e) => status(e.message, true));
  $('color').onchange = () => loadColumn($('color').value).catch((e) => status(e.message, true));
  for (const b of document.querySelectorAll('[data-mode]')) b.onclick = () => setMode(b.dataset.mode);
  $('show-map').onchange = () => showMap().catch((e) => status(e.message, true));
  $('level').oninput = setLevel;
  $('sel-save').onclick = () => saveSelection().catch((e) => status(e.message, true));
  $('path-make').onclick = () => makePath({ particles: state.path }).catch((e) => status(e.message, true));
  $('path-pc1').onclick = () => makePath({ pc: 1 }).catch((e) => status(e.message, true));
  $('path-clear').onclick = clearPath;
  $('play').onclick = togglePlay;
  window.addEventListener('resize', () => {
    const { width, height } = $('scatter').getBoundingClientRect();
    scatter.set({ width, height });
  });
}

const META = getJSON('api/meta'); // asked for as soon as the script runs
const t0mark = (k) => { if (state.timings) state.timings[k] = performance.now(); };
async function start() {
  state.timings = { start: performance.now() };
  state.meta = await META;
  state.n = state.meta.particles;
  t0mark('meta');
  // the first colour column and axes are fetched while the page builds its widgets
  const first = state.meta.columns.includes('k-means cluster') ? 'k-means cluster' : state.meta.columns[0];
  const columnFetch = first ? call(`api/column?name=${encodeURIComponent(first)}`) : null;
  const axesFetch = getFloats(`api/embedding?axes=${encodeURIComponent(state.meta.axes[0])}`);
  $('run').textContent = state.meta.run;
  $('facts').textContent = `${state.n.toLocaleString()} particles · zdim ${state.meta.zdim} · ` +
    `${state.meta.atoms.toLocaleString()} atoms`;
  $('axes').innerHTML = state.meta.axes.map((a) => `<option>${a}</option>`).join('');
  $('color').innerHTML = state.meta.columns.map((c) => `<option>${escapeHtml(c)}</option>`).join('');
  $('clusters').innerHTML = state.meta.clusters.map((c) =>
    `<button data-cluster="${c.id}" style="border-color:${CATEGORICAL[c.id % 32]}">${c.id} · ${c.count}</button>`)
    .join('');
  for (const b of $('clusters').querySelectorAll('button')) {
    b.onclick = () => showModel(`cluster=${b.dataset.cluster}`, `cluster ${b.dataset.cluster} centre`)
      .catch((e) => status(e.message, true));
  }
  const canvas = $('scatter');
  const { width, height } = canvas.getBoundingClientRect();
  scatter = createScatterplot({
    canvas, width, height, pointSize: state.n > 100000 ? 2 : 4, backgroundColor: '#ffffff',
    pointColorActive: '#000000', pointSizeSelected: 1, lassoColor: '#d62728', opacityInactiveMax: 0.35,
  });
  t0mark('scatterMade');
  scatter.subscribe('select', (e) => onSelect(e).catch((err) => status(err.message, true)));
  scatter.subscribe('deselect', () => { state.selection = []; updateSelection(); });
  stage = new NGL.Stage('viewer', { backgroundColor: 'white', tooltip: true });
  wire();
  updateSelection();
  clearPath();
  if (first) $('color').value = first;
  const t = state.timings;
  if (first) await loadColumn(first, false, columnFetch); // drawn once, with the axes
  t.column = performance.now();
  await loadAxes(state.meta.axes[0], axesFetch);
  t.drawn = performance.now();
  await listSelections();
  await listPaths();
  state.ready = true;
  document.body.dataset.ready = '1';
}

window.explorer = {
  state, lasso, pointToScreen, dataToScreen, saveSelection, showModel, makePath, loadAxes, loadColumn, listSelections,
  select: (idx) => scatter.select(idx),
  drawnPoints: () => (scatter ? scatter.get('points').length : 0),
  scatter: () => scatter,
  stage: () => stage,
};
window.addEventListener('DOMContentLoaded', () => start().catch((e) => status(`start failed: ${e.message}`, true)));
