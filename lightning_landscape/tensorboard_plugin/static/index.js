// The "Landscape" tab of TensorBoard (a dynamic plugin: TensorBoard imports this module inside
// an iframe whose base URL is data/plugin/landscape/ and calls render()).
//
// Sections appear only for the callback families a run logged (see families.py): Edge of
// stability (Sharpness), Spectrum (HessianEigenvalues), Depth (SampleVarianceDecay), Gradient
// flow (GradientFlowDeviation), Landscape (LossLandscape .npz files), K-FAC. Line charts overlay
// the selected runs with a legend; heatmaps are drawn per run, side by side. Each panel element
// carries data-panel (its kind), data-instance, data-run (heatmaps) and data-points.
//
// Which quantities a panel draws, their labels, the sections and their order come from the
// metric declarations (lightning_landscape/metrics.py) the backend serves as `metrics`: no
// tag is spelled here.

import {DASHES, PALETTE, el, fmt, heatmap, lineChart} from './static/charts.js';
import {decl, loadMetrics, naturalSort, pick} from './static/declared.js';

const state = {runs: {}, selected: new Set(), cache: new Map(), generation: 0};

const picked = (inst, kind) => pick(kind, inst.quantities);

async function getJSON(url) {
  if (!state.cache.has(url)) {
    state.cache.set(url, fetch(url).then((r) => {
      if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
      return r.json();
    }));
  }
  return state.cache.get(url);
}

const q = (params) => new URLSearchParams(params).toString();
const scalars = (run, instance) => getJSON(`scalars?${q({run, instance})}`);

export async function render() {
  for (const href of ['static/uPlot.min.css', 'static/style.css']) {
    document.head.appendChild(el('link', {rel: 'stylesheet', href}));
  }
  const runBox = el('div', {class: 'runs', id: 'runs'});
  const main = el('main', {id: 'main'});
  const reload = el('button', {text: 'Reload', onclick: () => load(runBox, main, true)});
  document.body.appendChild(el('header', {}, [el('h1', {text: 'Landscape'}), reload, runBox]));
  document.body.appendChild(main);
  await load(runBox, main, false);
}

async function load(runBox, main, again) {
  document.body.dataset.ready = 'false';
  state.cache.clear();
  try {
    await loadMetrics(getJSON);
    state.runs = (await getJSON('runs')).runs;
  } catch (err) {
    main.replaceChildren(el('p', {class: 'error', text: `Could not load runs: ${err}`}));
    document.body.dataset.ready = 'true';
    return;
  }
  const names = naturalSort(Object.keys(state.runs));  // depth_4 before depth_16
  if (!again || state.selected.size === 0) state.selected = new Set(names.slice(0, 8));
  runBox.replaceChildren(el('span', {class: 'label', text: 'Runs:'}));
  for (const run of names) {
    const box = el('input', {type: 'checkbox', 'data-run': run});
    box.checked = state.selected.has(run);
    box.addEventListener('change', () => {
      if (box.checked) state.selected.add(run); else state.selected.delete(run);
      draw(main);
    });
    runBox.appendChild(el('label', {class: 'run'}, [box, document.createTextNode(run)]));
  }
  await draw(main);
}

// {family: [{name, quantities: Set, runs: [...]}]} over the selected runs
function instances() {
  const out = {};
  for (const run of Object.keys(state.runs).filter((r) => state.selected.has(r))) {
    for (const [name, info] of Object.entries(state.runs[run].instances)) {
      const list = (out[info.family] = out[info.family] || []);
      let entry = list.find((e) => e.name === name);
      if (!entry) list.push((entry = {name, quantities: new Set(), runs: []}));
      info.quantities.forEach((x) => entry.quantities.add(x));
      entry.runs.push(run);
    }
  }
  return out;
}

async function draw(host) {
  // A newer draw (a check box clicked meanwhile) replaces this one's container.
  const generation = ++state.generation;
  document.body.dataset.ready = 'false';
  const main = el('div', {class: 'sections'});
  host.replaceChildren(main);
  const found = instances();
  const withFiles = [...state.selected].filter((r) => state.runs[r]?.landscape_steps.length);
  if (withFiles.length) found.landscape = [{name: 'landscape', quantities: new Set(), runs: withFiles}];
  const jobs = [];
  for (const family of decl.order) {
    for (const inst of found[family] || []) {
      const title = decl.titles[family] + (inst.name === family ? '' : ` — ${inst.name}`);
      const grid = el('div', {class: 'grid'});
      main.appendChild(el('section', {'data-family': family, 'data-instance': inst.name},
        [el('h2', {text: title}), grid]));
      jobs.push(SECTIONS[family](grid, inst).catch((err) => {
        grid.appendChild(el('p', {class: 'error', text: String(err)}));
      }));
    }
  }
  if (!jobs.length) {
    main.appendChild(el('p', {class: 'empty',
      text: 'No landscape/* data in the selected runs yet (lightning_landscape callbacks log it).'}));
  }
  await Promise.all(jobs);
  if (generation === state.generation) document.body.dataset.ready = 'true';
}

// A panel: title, controls, chart slot. Appended to the grid before drawing (for its width).
function panel(grid, kind, inst, title, caption, extra = {}) {
  const controls = el('div', {class: 'controls'});
  const host = el('div', {class: 'chart'});
  const node = el('div', {class: 'panel', 'data-panel': kind, 'data-instance': inst.name,
    'data-points': '0', ...extra}, [el('h3', {text: title}), controls, host,
    caption ? el('p', {class: 'caption', text: caption}) : null]);
  grid.appendChild(node);
  return {node, controls, host};
}

function logToggle(p, initial, redraw) {
  const box = el('input', {type: 'checkbox', class: 'log-toggle'});
  box.checked = initial;
  box.addEventListener('change', () => redraw(box.checked));
  p.controls.appendChild(el('label', {}, [box, document.createTextNode(' log scale')]));
  redraw(initial);
}

// Series of the `pick`ed quantities for every run of `inst`: distinct colours, dashes for the
// ones declared dashed.
async function seriesOf(inst, quantities) {
  const data = await Promise.all(inst.runs.map((run) => scalars(run, inst.name)));
  const out = [];
  const many = inst.runs.length > 1;
  inst.runs.forEach((run, r) => {
    for (const {q: qn, m, label} of quantities) {
      const d = data[r][qn];
      if (!d) continue;
      const i = out.length;
      out.push({label: many ? `${label} · ${run}` : label, steps: d.steps, values: d.values,
        color: PALETTE[i % PALETTE.length],
        dash: m.dashed ? [6, 3] : DASHES[Math.floor(i / PALETTE.length) % DASHES.length]});
    }
  });
  return out;
}

// Log scale by default (log: 'auto') when the positive values span more than `factor` (2.5
// decades unless the panel says otherwise).
function spansDecades(series, factor = 300) {
  const v = series.flatMap((s) => s.values).filter((x) => x > 0);
  return v.length > 0 && Math.max(...v) / Math.min(...v) > factor;
}

function linePanel(grid, inst, kind, title, caption, series, opts = {}) {
  const p = panel(grid, kind, inst, title, caption);
  const log = opts.log === 'auto' ? spansDecades(series, opts.logFactor) : Boolean(opts.log);
  logToggle(p, log, (on) => lineChart(p.node, p.host, {series, ...opts, log: on}));
  return p;
}

// The layer a quantity of panel `kind` belongs to (its placeholder), else undefined.
const layerOf = (kind) => (x) => pick(kind, [x])[0]?.arg;

const SECTIONS = {
  async sharpness(grid, inst) {
    const qs = picked(inst, 'eos');
    if (qs.length) {
      const series = await seriesOf(inst, qs);
      linePanel(grid, inst, 'eos', 'Sharpness vs stability threshold',
        'λ_max of the probe-loss Hessian (and of the preconditioned one) against the optimizer\'s threshold.',
        series, {yLabel: 'curvature', log: 'auto', logFactor: 10});  // > 10x: λ_max flat on a linear axis
    }
    const ratio = picked(inst, 'ratio');
    if (ratio.length) {
      const series = await seriesOf(inst, ratio);
      linePanel(grid, inst, 'ratio', 'Sharpness / threshold',
        '≈ 1 at the edge of stability.', series,
        {refs: [{label: 'edge of stability (1)', value: 1}], yLabel: 'ratio'});
    }
  },

  async hessian(grid, inst) {
    const qs = picked(inst, 'spectrum');
    if (qs.length) {
      const series = await seriesOf(inst, qs);
      linePanel(grid, inst, 'spectrum', 'Top eigenvalues and λ_min',
        'The k algebraically largest Hessian eigenvalues and the smallest one (log scale hides λ ≤ 0).',
        series, {yLabel: 'eigenvalue', log: 'auto'});
    }
    const trace = picked(inst, 'trace');
    if (trace.length) {
      const series = await seriesOf(inst, trace);
      linePanel(grid, inst, 'trace', 'Hessian trace', 'Hutch++ estimate of tr(H) on the probe.',
        series, {yLabel: 'trace', log: 'auto'});
    }
    const blockOf = layerOf('layer-eig');
    if ([...inst.quantities].some(blockOf)) {
      await layerProfile(grid, inst, 'layer-eig', 'Top eigenvalue by layer', blockOf,
        'λ_max of each layer\'s Hessian block (its parameters only, the rest fixed) by layer index, at the chosen step (each run: its latest measurement at or before it).',
        'block λ_max');
    }
    const rmedOf = layerOf('layer-rmed');
    if ([...inst.quantities].some(rmedOf)) {
      await layerProfile(grid, inst, 'layer-rmed', 'R_med by layer', rmedOf,
        'max |H_ii| / median |H_ii| over each layer\'s diagonal, at the chosen step.', 'R_med');
    }
    if (!picked(inst, 'density').length) return;
    await Promise.all(inst.runs.map(async (run) => {
      const d = await getJSON(`density?${q({run, instance: inst.name})}`);
      if (!d.steps.length) return;
      const p = panel(grid, 'density', inst, `Spectral density — ${run}`,
        'SLQ density by step, colour log10(density). TensorBoard keeps 10 text samples per tag unless started with --samples_per_plugin text=1000.',
        {'data-run': run});
      heatmap(p.node, p.host, {
        columns: d.steps.map((x, i) => ({x, ys: d.grids[i], values: d.densities[i]})),
        transform: (v) => (v > 0 ? Math.log10(v) : NaN), yLabel: 'eigenvalue', colourLabel: 'log10 density',
      });
    }));
  },

  async sample_variance(grid, inst) {
    const data = await Promise.all(inst.runs.map((run) => scalars(run, inst.name)));
    const layersOf = (d) => pick('depth', Object.keys(d)).map((x) => x.q);
    const per = inst.runs.map((run, r) => ({run, d: data[r], layers: layersOf(data[r])})).filter((x) => x.layers.length);
    for (const {run, d, layers} of per) {
      const steps = [...new Set(layers.flatMap((l) => d[l].steps))].sort((a, b) => a - b);
      const columns = steps.map((x) => ({x, ys: layers.map((_, i) => i + 1),
        values: layers.map((l) => { const k = d[l].steps.indexOf(x); return k < 0 ? null : d[l].values[k]; })}));
      const p = panel(grid, 'depth-heatmap', inst, `Sample-variance fraction by layer — ${run}`,
        `f of each layer (1 = ${layers[0]} … ${layers.length} = ${layers[layers.length - 1]}), common [0, 1] colour scale.`,
        {'data-run': run});
      heatmap(p.node, p.host, {columns, range: [0, 1], yLabel: 'layer', colourLabel: 'f',
        yTicks: layerTicks(layers.length)});
    }
    if (!per.length) return;
    const allSteps = [...new Set(per.flatMap(({d, layers}) => layers.flatMap((l) => d[l].steps)))].sort((a, b) => a - b);
    const p = panel(grid, 'depth-profile', inst, 'Depth profile at a step',
      'f by layer at the chosen step (each run: its latest measurement at or before it), axis [0, 1].');
    const slider = el('input', {type: 'range', min: '0', max: String(allSteps.length - 1), class: 'step-slider'});
    slider.value = String(allSteps.length - 1);
    const label = el('span', {class: 'step-label'});
    p.controls.append(slider, label);
    const names = per[0].layers;
    const redraw = () => {
      const step = allSteps[Number(slider.value)];
      label.textContent = ` step ${step}`;
      const series = per.map(({run, d, layers}, i) => {
        const values = layers.map((l) => atOrBefore(d[l], step));
        return {label: run, steps: layers.map((_, k) => k + 1), values, color: PALETTE[i % PALETTE.length]};
      });
      lineChart(p.node, p.host, {series, yRange: [0, 1], xLabel: 'layer', yLabel: 'f', xIncrs: [1, 2, 5, 10, 20, 50],
        xValue: (u, v) => (v == null ? '–' : `${v}: ${names[v - 1] ?? ''}`)});
    };
    slider.addEventListener('input', redraw);
    redraw();
  },

  async gradient_flow(grid, inst) {
    const qs = picked(inst, 'flow');
    if (!qs.length) return;
    const series = await seriesOf(inst, qs);
    linePanel(grid, inst, 'flow', 'Distance to gradient flow',
      'step_gap: one step vs the flow over the same time; deviation: a k-step window vs the RK4-integrated flow.',
      series, {log: true, yLabel: 'relative distance'});
  },

  async kfac(grid, inst) {
    const qs = picked(inst, 'kfac');
    if (qs.length) {
      const series = await seriesOf(inst, qs);
      linePanel(grid, inst, 'kfac', 'KL clipping and damping', 'ν ≤ 1 scales the K-FAC step; λ is the damping.',
        series, {yLabel: 'value', log: 'auto'});
    }
    const secs = picked(inst, 'kfac-seconds');
    if (secs.length) {
      const series = await seriesOf(inst, secs);
      linePanel(grid, inst, 'kfac-seconds', 'K-FAC seconds',
        'Wall time of the last factor update and of the last eigendecomposition.', series,
        {yLabel: 'seconds', log: 'auto'});
    }
  },

  async landscape(grid, inst) {
    const chosen = {};
    const interp = panel(grid, 'interpolation', inst, 'Initial → current weights',
      'Probe loss on the straight line θ0 → θ (t = 0: initial weights, t = 1: the saved step).');
    const drawInterp = () => {
      const series = Object.entries(chosen).filter(([, d]) => d.t).map(([run, d], i) => ({
        label: `${run} (step ${d.step}, barrier ${fmt(d.barrier)})`, steps: d.t, values: d.interpolation,
        color: PALETTE[i % PALETTE.length]}));
      // Runs answer in any order: a run without an interpolation must not drop the panel for good.
      if (!series.length) { interp.node.remove(); return; }
      if (!interp.node.isConnected) grid.prepend(interp.node);
      lineChart(interp.node, interp.host, {series, xLabel: 't', yLabel: 'probe loss'});
    };
    await Promise.all(inst.runs.map(async (run) => {
      const steps = state.runs[run].landscape_steps;
      const p = panel(grid, 'surface', inst, `Loss landscape — ${run}`, '', {'data-run': run});
      const select = el('select', {class: 'step-select'});
      for (const s of steps) select.appendChild(el('option', {value: String(s), text: `step ${s}`}));
      select.value = String(steps[steps.length - 1]);
      p.controls.append(el('span', {text: 'saved grid: '}), select);
      const show = async () => {
        const d = await getJSON(`landscape?${q({run, step: select.value})}`);
        chosen[run] = d;
        drawSurface(p, d);
        drawInterp();
      };
      select.addEventListener('change', show);
      await show();
    }));
  },
};

function drawSurface(p, d) {
  const caption = p.node.querySelector('.caption') || p.node.appendChild(el('p', {class: 'caption'}));
  if (d.betas) {
    const columns = d.alphas.map((x, i) => ({x, ys: d.betas, values: d.losses.map((row) => row[i])}));
    heatmap(p.node, p.host, {columns, transform: (v) => (v > 0 ? Math.log10(v) : NaN), contours: 12,
      marks: [{x: 0, y: 0, label: 'θ'}], xLabel: 'α (direction 1)', yLabel: 'β (direction 2)',
      colourLabel: 'log10 loss'});
    caption.textContent = `Probe loss on θ + α d1 + β d2 (filter-normalised directions), step ${d.step}; loss at θ ${fmt(d.center)}.`;
  } else {
    lineChart(p.node, p.host, {series: [{label: 'probe loss', steps: d.alphas, values: d.losses, color: PALETTE[0]}],
      xLabel: 'α (filter-normalised direction)', yLabel: 'probe loss'});
    caption.textContent = `Probe loss on θ + α d, step ${d.step}; loss at θ ${fmt(d.center)}.`;
  }
}

// One line per run over the layer index (natural order of the layer names `layerOf` picks from
// the quantities), at the step chosen with a slider; log scale when the values span decades.
async function layerProfile(grid, inst, kind, title, layerOf, caption, yLabel) {
  const data = await Promise.all(inst.runs.map((run) => scalars(run, inst.name)));
  const per = inst.runs.map((run, r) => {
    const keys = Object.keys(data[r]).filter(layerOf);
    const byLayer = new Map(keys.map((k) => [layerOf(k), data[r][k]]));
    return {run, byLayer, layers: naturalSort([...byLayer.keys()])};
  }).filter((x) => x.layers.length);
  if (!per.length) return;
  const allSteps = [...new Set(per.flatMap(({byLayer}) => [...byLayer.values()].flatMap((d) => d.steps)))]
    .sort((a, b) => a - b);
  const p = panel(grid, kind, inst, title, caption);
  const slider = el('input', {type: 'range', min: '0', max: String(allSteps.length - 1), class: 'step-slider'});
  slider.value = String(allSteps.length - 1);
  const label = el('span', {class: 'step-label'});
  if (allSteps.length > 1) p.controls.append(slider);
  p.controls.append(label);
  const longest = per.reduce((a, b) => (b.layers.length > a.layers.length ? b : a)).layers;
  const seriesAt = (step) => per.map(({run, byLayer, layers}, i) => ({
    label: run, steps: layers.map((_, k) => k + 1), values: layers.map((l) => atOrBefore(byLayer.get(l), step)),
    color: PALETTE[i % PALETTE.length], dash: DASHES[Math.floor(i / PALETTE.length) % DASHES.length]}));
  const box = el('input', {type: 'checkbox', class: 'log-toggle'});
  box.checked = spansDecades(seriesAt(allSteps[allSteps.length - 1]));
  p.controls.prepend(el('label', {}, [box, document.createTextNode(' log scale')]));
  const redraw = () => {
    const step = allSteps[Number(slider.value)];
    label.textContent = ` step ${step}`;
    lineChart(p.node, p.host, {series: seriesAt(step), log: box.checked, xLabel: 'layer', yLabel,
      xIncrs: [1, 2, 5, 10, 20, 50], xValue: (u, v) => (v == null ? '–' : `${v}: ${longest[v - 1] ?? ''}`)});
  };
  slider.addEventListener('input', redraw);
  box.addEventListener('change', redraw);
  redraw();
}

function atOrBefore(series, step) {
  let best = null;
  series.steps.forEach((s, i) => { if (s <= step) best = series.values[i]; });
  return best;
}

function layerTicks(n) {
  const every = Math.max(1, Math.ceil(n / 10));
  return Array.from({length: n}, (_, i) => i + 1).filter((i) => i === 1 || i % every === 0)
    .map((i) => ({at: i, label: String(i)}));
}
