// Charts of the "Landscape" tab: line charts (uPlot) and canvas heatmaps with contours.
//
// Every chart sets `data-points` on its panel element once drawn: the number of finite data
// points (line charts) or cells (heatmaps) it shows. Tests read it; 0 means "nothing drawn".

import uPlot from './uPlot.esm.js';

// Tableau 10: distinct, colour-blind-friendlier than the default cycle.
export const PALETTE = [
  '#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f',
  '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#7f7f7f',
];
export const DASHES = [[], [8, 4], [2, 3], [10, 3, 2, 3]];

export function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of [].concat(children)) if (child != null) node.appendChild(child);
  return node;
}

export function fmt(v) {
  if (v == null || !Number.isFinite(v)) return '–';
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

// Align series with different steps on the union of their steps (missing points are null).
function align(series) {
  const xs = [...new Set(series.flatMap((s) => s.steps))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const ys = series.map((s) => {
    const out = new Array(xs.length).fill(null);
    s.steps.forEach((x, i) => { out[index.get(x)] = s.values[i]; });
    return out;
  });
  return [xs, ...ys];
}

// A uPlot line chart in `host` (a .panel element's chart slot).
// opts: {series: [{label, steps, values, color, dash, width}], log, refs: [{label, value}],
//        xLabel, yLabel, yRange: [min, max] | null, xValue: legend text of x, xIncrs: tick steps}
export function lineChart(panel, host, opts) {
  host.replaceChildren();
  const log = Boolean(opts.log);
  const series = opts.series.filter((s) => s.steps.length > 0);
  const refs = opts.refs || [];
  const data = series.length ? align(series) : [[]];
  const xs = data[0];
  for (const ref of refs) data.push(xs.map(() => ref.value));
  if (log) {
    for (let i = 1; i < data.length; i++) data[i] = data[i].map((v) => (v > 0 ? v : null));
  }
  let points = 0;
  for (let i = 1; i <= series.length; i++) points += data[i].filter((v) => v != null).length;
  const width = Math.max(320, host.clientWidth || 460);
  const uSeries = [{label: opts.xLabel || 'step', value: opts.xValue || ((u, v) => v)}];
  series.forEach((s) => uSeries.push({
    label: s.label, stroke: s.color, width: s.width || 2, dash: s.dash || [],
    spanGaps: true, points: {show: true, size: 4, fill: s.color},
    value: (u, v) => fmt(v),
  }));
  refs.forEach((r) => uSeries.push({
    label: r.label, stroke: '#555', width: 1.5, dash: [6, 4], points: {show: false},
    value: (u, v) => fmt(v),
  }));
  const yScale = log ? {distr: 3} : {};
  if (opts.yRange && !log) yScale.range = () => opts.yRange;
  const chart = new uPlot({
    width, height: opts.height || 260,
    series: uSeries,
    scales: {x: {time: false}, y: yScale},
    axes: [
      {label: opts.xLabel || 'step', ...(opts.xIncrs ? {incrs: opts.xIncrs} : {})},
      {label: opts.yLabel || '', size: 60, values: (u, vals) => vals.map(fmt)},
    ],
    legend: {live: true},
    cursor: {drag: {x: true, y: false}},
  }, data, host);
  panel.dataset.points = String(points);
  panel.dataset.series = String(series.length);
  return chart;
}

// viridis, 9 stops
const VIRIDIS = ['#440154', '#472d7b', '#3b528b', '#2c728e', '#21918c', '#28ae80', '#5ec962',
  '#addc30', '#fde725'].map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));

export function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + f * (VIRIDIS[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

export function niceTicks(lo, hi, count = 6) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

// Edges of cells centred on sorted `centres` (half a gap beyond the ends).
function edges(centres) {
  const n = centres.length;
  if (n === 1) return [centres[0] - 0.5, centres[0] + 0.5];
  const out = [centres[0] - (centres[1] - centres[0]) / 2];
  for (let i = 0; i < n - 1; i++) out.push((centres[i] + centres[i + 1]) / 2);
  out.push(centres[n - 1] + (centres[n - 1] - centres[n - 2]) / 2);
  return out;
}

// A heatmap of columns in `host`. opts: {columns: [{x, ys: [...], values: [...]}], range: [lo,
// hi] | null (colour scale, else from the data), transform: v => number (e.g. log10),
// xLabel, yLabel, title, yTicks: [{at, label}] (categorical), contours: n levels (regular grid
// only), marks: [{x, y, label}], colourLabel}
export function heatmap(panel, host, opts) {
  host.replaceChildren();
  const width = Math.max(320, host.clientWidth || 460);
  const height = opts.height || 280;
  const pad = {l: 64, r: 70, t: 22, b: 40};
  const canvas = el('canvas');
  const dpr = window.devicePixelRatio || 1;
  canvas.width = width * dpr; canvas.height = height * dpr;
  canvas.style.width = `${width}px`; canvas.style.height = `${height}px`;
  host.appendChild(canvas);
  const ctx = canvas.getContext('2d');
  ctx.scale(dpr, dpr);
  const tr = opts.transform || ((v) => v);
  const cols = opts.columns.filter((c) => c.ys.length > 0);
  const xsAll = cols.map((c) => c.x);
  const xEdges = edges(xsAll.length ? xsAll : [0]);
  let yLo = Infinity, yHi = -Infinity, vLo = Infinity, vHi = -Infinity;
  const yEdgesOf = cols.map((c) => edges(c.ys));
  for (const [i, c] of cols.entries()) {
    yLo = Math.min(yLo, yEdgesOf[i][0]); yHi = Math.max(yHi, yEdgesOf[i][c.ys.length]);
    for (const v of c.values) {
      const t = v == null ? NaN : tr(v);
      if (Number.isFinite(t)) { vLo = Math.min(vLo, t); vHi = Math.max(vHi, t); }
    }
  }
  if (opts.range) [vLo, vHi] = opts.range;
  if (!(vHi > vLo)) vHi = vLo + 1;
  const plotW = width - pad.l - pad.r, plotH = height - pad.t - pad.b;
  const px = (x) => pad.l + ((x - xEdges[0]) / (xEdges[xEdges.length - 1] - xEdges[0])) * plotW;
  const py = (y) => pad.t + plotH - ((y - yLo) / (yHi - yLo || 1)) * plotH;
  let cells = 0;
  ctx.fillStyle = '#eee';
  ctx.fillRect(pad.l, pad.t, plotW, plotH);
  cols.forEach((c, i) => {
    const x0 = px(xEdges[i]), x1 = px(xEdges[i + 1]);
    c.values.forEach((v, j) => {
      const t = v == null ? NaN : tr(v);
      if (!Number.isFinite(t)) return;
      ctx.fillStyle = colour((t - vLo) / (vHi - vLo));
      const y0 = py(yEdgesOf[i][j + 1]), y1 = py(yEdgesOf[i][j]);
      ctx.fillRect(x0, y0, x1 - x0 + 0.5, y1 - y0 + 0.5);
      cells += 1;
    });
  });
  if (opts.contours && cols.length > 1) drawContours(ctx, cols, tr, vLo, vHi, opts.contours, px, py);
  ctx.fillStyle = '#fff'; ctx.strokeStyle = '#000';
  for (const m of opts.marks || []) {
    ctx.beginPath(); ctx.arc(px(m.x), py(m.y), 4, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
    ctx.fillStyle = '#000'; ctx.font = '11px sans-serif';
    ctx.fillText(m.label, px(m.x) + 6, py(m.y) - 6); ctx.fillStyle = '#fff';
  }
  drawAxes(ctx, {pad, plotW, plotH, width, height, px, py, xEdges, yLo, yHi, opts});
  drawColourbar(ctx, {x: width - pad.r + 14, y: pad.t, h: plotH, vLo, vHi, label: opts.colourLabel});
  panel.dataset.points = String(cells);
  return {cells, range: [vLo, vHi]};
}

function drawAxes(ctx, a) {
  const {pad, plotW, plotH, height, px, py, xEdges, yLo, yHi, opts} = a;
  ctx.strokeStyle = '#333'; ctx.fillStyle = '#222'; ctx.font = '11px sans-serif';
  ctx.strokeRect(pad.l, pad.t, plotW, plotH);
  ctx.textAlign = 'center'; ctx.textBaseline = 'top';
  const xTicks = opts.xTicks || niceTicks(xEdges[0], xEdges[xEdges.length - 1]).map((v) => ({at: v, label: fmt(v)}));
  for (const t of xTicks) {
    if (t.at < xEdges[0] || t.at > xEdges[xEdges.length - 1]) continue;
    ctx.beginPath(); ctx.moveTo(px(t.at), pad.t + plotH); ctx.lineTo(px(t.at), pad.t + plotH + 4); ctx.stroke();
    ctx.fillText(t.label, px(t.at), pad.t + plotH + 6);
  }
  ctx.fillText(opts.xLabel || 'step', pad.l + plotW / 2, height - 14);
  ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  const yTicks = opts.yTicks || niceTicks(yLo, yHi).map((v) => ({at: v, label: fmt(v)}));
  for (const t of yTicks) {
    if (t.at < yLo || t.at > yHi) continue;
    ctx.beginPath(); ctx.moveTo(pad.l - 4, py(t.at)); ctx.lineTo(pad.l, py(t.at)); ctx.stroke();
    ctx.fillText(t.label, pad.l - 6, py(t.at));
  }
  ctx.save(); ctx.translate(12, pad.t + plotH / 2); ctx.rotate(-Math.PI / 2);
  ctx.textAlign = 'center'; ctx.fillText(opts.yLabel || '', 0, 0); ctx.restore();
}

function drawColourbar(ctx, {x, y, h, vLo, vHi, label}) {
  for (let i = 0; i < h; i++) {
    ctx.fillStyle = colour(1 - i / h);
    ctx.fillRect(x, y + i, 12, 1.5);
  }
  ctx.strokeStyle = '#333'; ctx.strokeRect(x, y, 12, h);
  ctx.fillStyle = '#222'; ctx.textAlign = 'left'; ctx.textBaseline = 'middle';
  ctx.font = '10px sans-serif';
  ctx.fillText(fmt(vHi), x + 15, y + 4);
  ctx.fillText(fmt(vLo), x + 15, y + h - 4);
  if (label) {
    ctx.save(); ctx.translate(x + 30, y + h / 2); ctx.rotate(Math.PI / 2);
    ctx.textAlign = 'center'; ctx.fillText(label, 0, 0); ctx.restore();
  }
}

// Marching squares on a regular grid of columns (same ys in every column).
function drawContours(ctx, cols, tr, vLo, vHi, levels, px, py) {
  const ys = cols[0].ys;
  const z = cols.map((c) => c.values.map((v) => (v == null ? NaN : tr(v))));
  ctx.strokeStyle = 'rgba(255,255,255,0.8)'; ctx.lineWidth = 1;
  for (let k = 1; k < levels; k++) {
    const level = vLo + ((vHi - vLo) * k) / levels;
    ctx.beginPath();
    for (let i = 0; i + 1 < cols.length; i++) {
      for (let j = 0; j + 1 < ys.length; j++) {
        const corners = [[i, j], [i + 1, j], [i + 1, j + 1], [i, j + 1]];
        const pts = [];
        for (let e = 0; e < 4; e++) {
          const [ai, aj] = corners[e], [bi, bj] = corners[(e + 1) % 4];
          const za = z[ai][aj], zb = z[bi][bj];
          if (!Number.isFinite(za) || !Number.isFinite(zb)) continue;
          if ((za < level) === (zb < level)) continue;
          const f = (level - za) / (zb - za);
          const x = cols[ai].x + f * (cols[bi].x - cols[ai].x);
          const y = ys[aj] + f * (ys[bj] - ys[aj]);
          pts.push([px(x), py(y)]);
        }
        for (let p = 0; p + 1 < pts.length; p += 2) {
          ctx.moveTo(pts[p][0], pts[p][1]); ctx.lineTo(pts[p + 1][0], pts[p + 1][1]);
        }
      }
    }
    ctx.stroke();
  }
  ctx.lineWidth = 1;
}
