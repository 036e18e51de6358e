// The metric declarations of lightning_landscape/metrics.py, as the backend serves them
// (`metrics`): the sections in order and, per panel kind, the quantities it draws (regexes,
// one group per placeholder such as <module>) with their legend labels.

// family order, section titles, and panel kind → [declaration with `re` and placeholder `names`]
export const decl = {order: [], titles: {}, byPanel: {}};

export async function loadMetrics(getJSON) {
  const table = await getJSON('metrics');
  decl.order = table.families.map((f) => f.family);
  decl.titles = Object.fromEntries(table.families.map((f) => [f.family, f.section]));
  decl.byPanel = {};
  for (const m of table.families.flatMap((f) => f.metrics).filter((x) => x.panel)) {
    const names = [...m.quantity.matchAll(/<(\w+)>/g)].map((x) => x[1]);
    (decl.byPanel[m.panel] = decl.byPanel[m.panel] || []).push({...m, re: new RegExp(m.pattern), names});
  }
}

// The quantities (of `inst`, or the keys of `names`) that panel `kind` draws, in declaration
// order (several matches of one declaration: natural order): [{q, m, label}].
export function pick(kind, names) {
  const out = [];
  for (const m of decl.byPanel[kind] || []) {
    const found = [];
    for (const q of names) {
      const g = m.re.exec(q);
      if (!g) continue;
      const label = m.label.replace(/<(\w+)>/g, (all, n) => g[1 + m.names.indexOf(n)] ?? all);
      found.push({q, m, label, arg: g[1]});
    }
    const order = naturalSort(found.map((x) => x.q));
    out.push(...found.sort((a, b) => order.indexOf(a.q) - order.indexOf(b.q)));
  }
  return out;
}

export function naturalSort(names) {
  const key = (s) => s.split(/(\d+)/).map((p) => (/^\d+$/.test(p) ? p.padStart(12, '0') : p)).join('');
  return [...names].sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
}
