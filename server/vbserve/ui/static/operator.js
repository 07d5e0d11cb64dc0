// The operator's view (admin key): tenants with their limits and usage, their keys (a new
// key is shown once; revoke), and the engine's live state from the server's own /metrics.

import { api } from "./api.js";
import { bytes, field, h, notice, replace, table, when } from "./dom.js";

const ENGINE_REFRESH_MS = 2000;

export async function render(view) {
  const status = notice();
  const tenants = h("section", { class: "card" });
  const engine = h("section", { class: "card" }, h("h2", {}, "Engine"));
  const refresh = () => showTenants(tenants, status);
  replace(view, h("h1", {}, "Operator"), engine, createTenantForm(refresh, status), status.el, tenants);
  await Promise.all([refresh(), showEngine(engine)]);
  const timer = setInterval(() => showEngine(engine).catch(() => {}), ENGINE_REFRESH_MS);
  return () => clearInterval(timer);
}

// -- engine -------------------------------------------------------------------------------

// Prometheus text format, the few unlabelled-or-simply-labelled samples this view reads:
// `name{labels} value` -> Map(name -> [{labels, value}]).
function parseMetrics(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = Object.fromEntries([...(match[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]));
    if (!samples.has(match[1])) samples.set(match[1], []);
    samples.get(match[1]).push({ labels, value: Number(match[3]) });
  }
  return samples;
}

async function showEngine(section) {
  const text = await (await api("/metrics", { raw: true })).text();
  const m = parseMetrics(text);
  const one = (name, labels = {}) => (m.get(name) ?? [])
    .find((s) => Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value;
  const maxLora = (m.get("vbserve_lora_requests_info") ?? [])[0]?.labels.max_lora ?? "?";
  const item = (term, value) => [h("dt", {}, term), h("dd", { dataset: { metric: term } }, value)];
  replace(section, h("h2", {}, "Engine"), h("dl", { class: "stats" },
    item("Running requests", String(one("vbserve_running_requests") ?? "–")),
    item("Waiting requests", String(one("vbserve_queue_length") ?? "–")),
    item("Adapter slots in use", `${one("vbserve_lora_adapters", { state: "running" }) ?? 0} / ${maxLora}`),
    item("Adapters waiting", String(one("vbserve_lora_adapters", { state: "waiting" }) ?? 0)),
    item("Adapter cache", bytes(one("vbserve_adapter_cache_bytes"))),
    item("Tokens generated", String(one("vbserve_generated_tokens_total") ?? "–"))),
  h("p", { class: "muted" }, "This replica's /metrics, every 2 s."));
}

// -- tenants and keys ---------------------------------------------------------------------

const limit = (value) => (value === null || value === undefined ? "none" : String(value));
const rates = ({ requests_per_s: perSecond, max_concurrent_generations: atOnce }) => [
  perSecond == null ? "any rate" : `${perSecond} requests/s`,
  atOnce == null ? "any concurrency" : `${atOnce} generations at once`,
].join(", ");

async function showTenants(section, status) {
  const { data } = await api("/v1/admin/tenants");
  const rows = data.map((t) => [
    h("span", { class: "name" }, t.name),
    when(t.created),
    `${t.adapters} / ${limit(t.effective_limits.max_adapters)}`,
    `${bytes(t.stored_bytes)} / ${t.effective_limits.max_adapter_bytes == null ? "none" : bytes(t.effective_limits.max_adapter_bytes)}`,
    t.active_jobs === null ? "–" : String(t.active_jobs),
    rates(t.effective_limits),
    keysPanel(t.name, status),
  ]);
  replace(section, h("h2", {}, `Tenants (${data.length})`), rows.length
    ? table(["Tenant", "Created", "Adapters", "Bytes stored", "Jobs queued or running", "Rate limits", "Keys"], rows)
    : h("p", { class: "muted" }, "No tenants yet."));
}

function keysPanel(tenant, status) {
  const body = h("div", { class: "keys" });
  const path = `/v1/admin/tenants/${encodeURIComponent(tenant)}/keys`;
  async function load() {
    const { data } = await api(path);
    const rows = data.map((k) => [
      h("code", {}, k.key_id), k.description, when(k.created),
      k.revoked ? `revoked ${when(k.revoked)}` : h("button", { class: "small danger", on: { click: async () => {
        try {
          await api(`${path}/${encodeURIComponent(k.key_id)}`, { method: "DELETE" });
          status.ok(`Revoked key ${k.key_id} of ${tenant}.`);
          await load();
        } catch (error) {
          status.error(error);
        }
      } } }, "Revoke"),
    ]);
    const description = h("input", { name: "description", placeholder: "description", maxlength: 200 });
    const create = h("form", { class: "inline", on: { submit: async (event) => {
      event.preventDefault();
      try {
        const created = await api(path, { method: "POST", json: { description: description.value } });
        await load();
        // After load(): the new key stays on screen (once) until the panel is reloaded.
        body.prepend(h("p", { class: "notice ok new-key" }, "New key, shown only now: ", h("code", {}, created.key)));
      } catch (error) {
        status.error(error);
      }
    } } }, description, h("button", { type: "submit", class: "small" }, "New key"));
    replace(body, rows.length ? table(["Key id", "Description", "Created", ""], rows) : h("p", { class: "muted" }, "No keys."), create);
  }
  const details = h("details", { on: { toggle: () => { if (details.open) load().catch((e) => status.error(e)); } } },
    h("summary", {}, "Keys"), body);
  return details;
}

function createTenantForm(refresh, status) {
  const name = h("input", { name: "tenant", required: true, placeholder: "acme", autocomplete: "off" });
  return h("form", { class: "card", on: { submit: async (event) => {
    event.preventDefault();
    try {
      await api("/v1/admin/tenants", { method: "POST", json: { name: name.value.trim() } });
      status.ok(`Created tenant ${name.value.trim()}.`);
      name.value = "";
      await refresh();
    } catch (error) {
      status.error(error);
    }
  } } }, h("h2", {}, "New tenant"), h("div", { class: "row" }, field("Name", name)), h("button", { type: "submit" }, "Create"));
}
