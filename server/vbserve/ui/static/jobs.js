// Fine-tuning: the tenant's jobs, a form to start one (its hyperparameter fields and their
// defaults come from the server's own OpenAPI schema), and a job page that follows the
// job's event stream: a live loss chart, throughput, ETA, status and cancel.

import { api, sse } from "./api.js";
import { duration, field, h, notice, replace, table, when } from "./dom.js";
import uPlot from "./vendor/uPlot.esm.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const FORM_FILES = new Set(["training_file", "validation_file", "adapter", "hyperparameters"]);

export function render(view, jobId) {
  return jobId ? renderJob(view, jobId) : renderList(view);
}

async function renderList(view) {
  const status = notice();
  const list = h("section", { class: "card" });
  const [page, form] = await Promise.all([api("/v1/fine_tuning/jobs?limit=50"), jobForm(status)]);
  const rows = page.data.map((job) => [
    h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id),
    h("span", { class: "name" }, job.adapter),
    badge(job.status),
    job.progress.total_steps ? `${job.progress.step} / ${job.progress.total_steps}` : "–",
    when(job.created_at),
  ]);
  replace(list, h("h2", {}, "Jobs"), rows.length
    ? table(["Job", "Adapter", "Status", "Steps", "Created"], rows)
    : h("p", { class: "muted" }, "No jobs yet."));
  replace(view, h("h1", {}, "Fine-tuning"), form, status.el, list);
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

// One input per hyperparameter of the upload form's schema, filled with its default.
async function jobForm(status) {
  const spec = await fetch("/openapi.json").then((r) => r.json());
  const schema = spec.paths["/v1/fine_tuning/jobs"].post.requestBody.content["multipart/form-data"].schema;
  const inputs = Object.entries(schema.properties).filter(([name]) => !FORM_FILES.has(name)).map(([name, prop]) => {
    const input = hyperparameterInput(name, prop);
    return { name, input, initial: input.value, label: field(name, input, prop.description) };
  });
  // Not required: a fit_lora job (the method field) reads no files.
  const training = h("input", { type: "file", name: "training_file", accept: ".jsonl,application/jsonl" });
  const validation = h("input", { type: "file", name: "validation_file", accept: ".jsonl,application/jsonl" });
  const adapter = h("input", { name: "adapter", required: true, placeholder: "support-v2", autocomplete: "off" });
  const form = h("form", { class: "card", on: { submit: async (event) => {
    event.preventDefault();
    status.clear();
    const body = new FormData();
    body.append("adapter", adapter.value.trim());
    if (training.files[0]) body.append("training_file", training.files[0]);
    if (validation.files[0]) body.append("validation_file", validation.files[0]);
    // Only what differs from the default: the server applies its defaults to the rest.
    for (const { name, input, initial } of inputs) {
      if (input.value.trim() !== "" && input.value !== initial) body.append(name, input.value.trim());
    }
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      status.error(error);
    }
  } } },
  h("h2", {}, "New job"),
  h("p", { class: "muted" }, 'JSONL rows: {"prompt": …, "completion": …} or {"messages": [...]}.'),
  h("div", { class: "row" },
    field("Adapter to publish", adapter),
    field("Training file", training),
    field("Validation file (optional)", validation)),
  h("details", { class: "hyper", open: true }, h("summary", {}, "Hyperparameters"),
    h("div", { class: "grid" }, inputs.map((i) => i.label))),
  h("button", { type: "submit" }, "Start job"));
  return form;
}

function hyperparameterInput(name, prop) {
  const options = prop.enum ?? prop.anyOf?.find((p) => p.enum)?.enum;
  const value = prop.default === undefined || prop.default === null ? "" : [prop.default].flat().join(",");
  if (options) {
    return h("select", { name }, options.map((o) => h("option", { value: o, selected: o === prop.default }, o)));
  }
  const numeric = [prop.type, ...(prop.anyOf ?? []).map((p) => p.type)].some((t) => t === "integer" || t === "number");
  return h("input", { name, value, type: numeric ? "number" : "text", step: numeric ? "any" : undefined,
    placeholder: value === "" ? "default" : undefined });
}

// -- one job ------------------------------------------------------------------------------

async function renderJob(view, jobId) {
  const path = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  let job = await api(path);
  const status = notice();
  const head = h("div", { class: "job-head" });
  const stats = h("dl", { class: "stats" });
  const errorBox = h("p", { class: "notice error", hidden: true, id: "job-error" });
  const chart = lossChart();
  const progress = { first: null, last: null };

  const cancel = h("button", { class: "danger", on: { click: async () => {
    try {
      job = await api(`${path}/cancel`, { method: "POST" });
      show();
    } catch (error) {
      status.error(error);
    }
  } } }, "Cancel job");

  function show() {
    replace(head, h("h1", {}, "Job ", h("code", {}, job.id)), badge(job.status),
      TERMINAL.has(job.status) || job.cancel_requested ? null : cancel);
    const p = progress.last ?? { step: job.progress.step, total_steps: job.progress.total_steps,
      loss: job.progress.loss, val_loss: job.progress.val_loss, tokens_per_s: job.progress.tokens_per_s };
    const item = (term, value) => [h("dt", {}, term), h("dd", {}, value)];
    replace(stats,
      item("Adapter", job.fine_tuned_model ? `${job.adapter} (version ${job.adapter_version})` : job.adapter),
      item("Status", job.cancel_requested && !TERMINAL.has(job.status) ? `${job.status}, cancelling` : job.status),
      item("Step", p.total_steps ? `${p.step} / ${p.total_steps}` : "–"),
      item("Training loss", fixed(p.loss)),
      item("Validation loss", fixed(p.val_loss)),
      item("Throughput", p.tokens_per_s ? `${Math.round(p.tokens_per_s)} tokens/s` : "–"),
      item("ETA", TERMINAL.has(job.status) ? "–" : duration(eta())),
      item("Created", when(job.created_at)),
      item("Finished", when(job.finished_at)));
    errorBox.hidden = !job.error;
    errorBox.textContent = job.error ? job.error.message : "";
  }

  // From the events' own clock: steps per second since the first event this page saw.
  function eta() {
    const { first, last } = progress;
    if (!first || !last || last.step <= first.step) return NaN;
    const rate = (last.step - first.step) / (last.created_at - first.created_at);
    return (last.total_steps - last.step) / rate;
  }

  replace(view, head, errorBox, h("section", { class: "card" }, stats),
    h("section", { class: "card" }, h("h2", {}, "Loss"), chart.el), status.el);
  show();

  const abort = new AbortController();
  (async () => {
    for await (const data of sse(`${path}/events?stream=true`, { signal: abort.signal })) {
      const item = JSON.parse(data);
      if (item.object === "fine_tuning.job") {
        job = item;
      } else if (item.object === "fine_tuning.job.event") {
        progress.first ??= item;
        progress.last = item;
        chart.add(item);
      } else if (item.error) {
        status.error(`${item.error.field ? `${item.error.field}: ` : ""}${item.error.message}`);
      }
      show();
    }
  })().catch((error) => { if (error.name !== "AbortError") status.error(error); });
  return () => abort.abort();
}

function fixed(value) {
  return value === null || value === undefined ? "–" : value.toFixed(4);
}

// A uPlot line chart of every loss-like metric the events carry (train_loss, valid_loss,
// and any other `*loss*` field), by step. A metric seen for the first time rebuilds it.
function lossChart() {
  const el = h("div", { class: "chart", dataset: { points: "0" } });
  const steps = [];
  const series = new Map(); // name -> values, aligned with steps (null where absent)
  let plot = null;

  function build() {
    plot?.destroy();
    const width = Math.max(el.clientWidth, 280);
    const palette = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"];
    plot = new uPlot({
      width, height: Math.round(Math.min(320, width * 0.6)),
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "loss" }],
      series: [{ label: "step" }, ...[...series.keys()].map((name, i) => ({
        label: name, stroke: palette[i % palette.length], width: 2, spanGaps: true,
      }))],
    }, [steps, ...series.values()], el);
  }

  function add(event) {
    const losses = Object.entries(event.data ?? {}).filter(([k, v]) => /loss/.test(k) && typeof v === "number");
    if (!losses.length) return;
    const fresh = losses.some(([name]) => !series.has(name));
    for (const [name] of losses) if (!series.has(name)) series.set(name, steps.map(() => null));
    steps.push(event.step);
    for (const [name, values] of series) values.push(event.data[name] ?? null);
    el.dataset.points = String(steps.length);
    if (fresh || !plot) build();
    else plot.setData([steps, ...series.values()]);
  }

  new ResizeObserver(() => { if (plot) plot.setSize({ width: Math.max(el.clientWidth, 280), height: plot.height }); })
    .observe(el);
  return { el, add };
}
