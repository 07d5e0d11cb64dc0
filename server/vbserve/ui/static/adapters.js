// The tenant's adapters: list (with residency in this replica's engine), upload, download
// in each format, delete with confirmation, and a usage snippet per adapter.

import { api, download } from "./api.js";
import { bytes, copyText, field, h, notice, replace, table, when } from "./dom.js";

const PAGE = 100;

export async function render(view) {
  const status = notice();
  const list = h("section", { class: "card" }, h("p", { class: "muted" }, "Loading…"));
  replace(view, h("h1", {}, "Adapters"), uploadForm(() => refresh(list, status), status), status.el, list);
  await refresh(list, status);
}

// `shown`: how many adapters were on screen, so a refresh after an upload or a delete
// keeps the pages the user had opened with "More".
async function refresh(list, status, shown = PAGE) {
  const [resident, models] = await Promise.all([api("/v1/engine/adapters"), api("/v1/models")]);
  const adapters = [];
  let page = { has_more: true, next_after: null };
  while (page.has_more && adapters.length < shown) {
    const after = page.next_after ? `&after=${encodeURIComponent(page.next_after)}` : "";
    page = await api(`/v1/adapters?limit=${PAGE}${after}`);
    adapters.push(...page.data);
  }
  const base = models.data[0]?.id ?? "base";
  const residency = new Map(resident.data.map((r) => [`${r.name}@${r.version}`, r.in_slot ? "in a slot" : "composed"]));
  const again = () => refresh(list, status, adapters.length);
  const rows = adapters.map((a) => [
    h("span", { class: "name" }, a.name),
    String(a.version),
    h("span", { title: `indices + weights ${bytes(a.body_bytes)}, bank ${bytes(a.bank_bytes)}` }, bytes(a.stored_bytes)),
    h("code", { title: a.bank_id }, a.bank_id.slice(0, 12)),
    when(a.created),
    when(a.updated),
    residency.get(`${a.name}@${a.version}`) ?? "no",
    actions(a, base, again, status),
  ]);
  const more = h("button", { class: "small", on: { click: () =>
    refresh(list, status, adapters.length + PAGE).catch((e) => status.error(e)) } }, "More");
  replace(list,
    h("h2", {}, `Your adapters (${adapters.length}${page.has_more ? "+" : ""})`),
    rows.length
      ? table(["Name", "Version", "Size", "Bank", "Created", "Updated", "Resident", ""], rows)
      : h("p", { class: "muted" }, "No adapters yet: upload one above, or fine-tune one."),
    page.has_more && more,
    h("p", { class: "muted" }, "Resident: composed in this server's engine cache (a request starts without loading it)."));
}

function actions(adapter, base, refresh, status) {
  const path = `/v1/adapters/${encodeURIComponent(adapter.name)}`;
  const get = (format) => h("button", { class: "small", on: { click: () =>
    download(`${path}/content?format=${format}`).catch((e) => status.error(e)) } }, format);
  const remove = h("button", { class: "small danger", on: { click: async () => {
    if (!remove.dataset.armed) { // the first click arms it: a second one within 4 s deletes
      remove.dataset.armed = "1";
      remove.textContent = `Delete ${adapter.name}?`;
      setTimeout(() => { delete remove.dataset.armed; remove.textContent = "Delete"; }, 4000);
      return;
    }
    try {
      await api(path, { method: "DELETE" });
      status.ok(`Deleted ${adapter.name}.`);
      await refresh();
    } catch (error) {
      status.error(error);
    }
  } } }, "Delete");
  return h("div", { class: "actions" }, h("span", { class: "muted" }, "download"), get("native"), get("peft"), get("lora"),
    remove, snippet(adapter.name, base));
}

function snippet(name, base) {
  const origin = location.origin;
  const curl = [
    `curl -s ${origin}/v1/chat/completions -H "Authorization: Bearer $VBSERVE_API_KEY" \\`,
    "  -H 'content-type: application/json' \\",
    `  -d '${JSON.stringify({ model: name, messages: [{ role: "user", content: "Hello" }], max_tokens: 64 })}'`,
  ].join("\n");
  const python = [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${origin}/v1", api_key=os.environ["VBSERVE_API_KEY"])`,
    `reply = client.chat.completions.create(model=${JSON.stringify(name)}, messages=[{"role": "user", "content": "Hello"}])`,
    `# the base model alone: model=${JSON.stringify(base)}`,
  ].join("\n");
  const block = (label, text) => {
    const copy = h("button", { class: "small", on: { click: () => copyText(copy, text) } }, "Copy");
    return h("div", { class: "snippet" }, h("div", { class: "snippet-head" }, label, copy), h("pre", {}, text));
  };
  return h("details", {}, h("summary", {}, "Use it"), block("curl", curl), block("openai (Python)", python));
}

function uploadForm(refresh, status) {
  const name = h("input", { name: "name", required: true, placeholder: "support", autocomplete: "off" });
  const files = h("input", { type: "file", name: "files", multiple: true, required: true });
  const form = h("form", { class: "card", on: { submit: async (event) => {
    event.preventDefault();
    status.clear();
    try {
      const body = uploadBody([...files.files]);
      const record = await api(`/v1/adapters/${encodeURIComponent(name.value.trim())}`, { method: "PUT", ...body });
      status.ok(`Uploaded ${record.name}, version ${record.version}.`);
      form.reset();
      await refresh();
    } catch (error) {
      status.error(error);
    }
  } } },
  h("h2", {}, "Upload"),
  h("div", { class: "row" },
    field("Name", name),
    field("Files", files, "One adapter blob (.safetensors), or a PEFT folder's adapter_config.json + adapter_model.safetensors")),
  h("button", { type: "submit" }, "Upload"));
  return form;
}

// A PEFT checkpoint (its two files, as multipart) or our blob (the bytes themselves).
function uploadBody(chosen) {
  const config = chosen.find((f) => f.name === "adapter_config.json");
  if (config) {
    const weights = chosen.find((f) => f.name === "adapter_model.safetensors");
    if (!weights) throw new Error("adapter_model.safetensors: choose it together with adapter_config.json");
    const form = new FormData();
    form.append("adapter_config.json", config, config.name);
    form.append("adapter_model.safetensors", weights, weights.name);
    return { body: form };
  }
  if (chosen.length !== 1) throw new Error("files: choose one adapter blob, or the two files of a PEFT checkpoint");
  return { body: new Blob([chosen[0]], { type: "application/octet-stream" }) };
}
