// Building the page. Every value from the API goes in as text (text nodes, textContent,
// attribute values), never as HTML: a name like "<img onerror=...>" shows as those
// characters. Nothing here touches innerHTML.

// h("button", {class: "x", on: {click}, attrs: {type: "submit"}}, "text", childNode, ...)
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "on") for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name in el && typeof value !== "string") el[name] = value; // properties: checked, disabled, ...
    else el.setAttribute(name, String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false).map(toNode));
  return el;
}

const toNode = (child) => (child instanceof Node ? child : document.createTextNode(String(child)));

export function replace(parent, ...children) {
  parent.replaceChildren(...children.flat().filter(Boolean).map(toNode));
}

// A table; on a phone each row becomes a card whose cells carry their column's name
// (data-label, shown by app.css) instead of squeezing the columns.
export function table(columns, rows) {
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows.map((cells) => h("tr", {},
        cells.map((c, i) => h("td", { dataset: { label: columns[i] } }, c)))))));
}

export function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", { class: "label" }, label), input, hint && h("small", {}, hint));
}

// A status line for a form: errors in red, as the API words them ("field: reason").
export function notice() {
  const el = h("p", { class: "notice", role: "status" });
  return {
    el,
    error(err) { el.className = "notice error"; el.textContent = err instanceof Error ? err.message : String(err); },
    ok(text) { el.className = "notice ok"; el.textContent = text; },
    clear() { el.className = "notice"; el.textContent = ""; },
  };
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(unixSeconds) {
  if (!unixSeconds) return "–";
  return new Date(unixSeconds * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" });
}

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

export async function copyText(button, text) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and copy";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}
