// The playground: one prompt sent at once to the base model and to the chosen adapters,
// each answer streamed into its own pane, with its latency and tokens/s.

import { api, sse } from "./api.js";
import { field, h, notice, replace } from "./dom.js";

export async function render(view) {
  const [models, adapters] = await Promise.all([api("/v1/models"), api("/v1/adapters?limit=100")]);
  const base = models.data[0].id;
  const status = notice();
  const prompt = h("textarea", { name: "prompt", rows: 4, required: true }, "Write a haiku about small adapters.");
  const mode = h("select", { name: "mode" }, h("option", { value: "chat" }, "chat"),
    h("option", { value: "completion" }, "completion"));
  const number = (name, value, attrs) => h("input", { name, type: "number", value, step: "any", ...attrs });
  const settings = {
    temperature: number("temperature", "0.7", { min: 0, max: 2 }),
    top_p: number("top_p", "1", { min: 0, max: 1 }),
    max_tokens: number("max_tokens", "64", { min: 1, step: 1 }),
    seed: number("seed", "", { step: 1, placeholder: "random" }),
  };
  const targets = [base, ...adapters.data.map((a) => a.name)].map((name, i) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "target", value: name, checked: i < 3 }),
    h("span", { class: "name" }, name), i === 0 ? h("small", {}, " (base model)") : null));
  const panes = h("div", { class: "panes" });
  let running = null;

  const form = h("form", { class: "card", on: { submit: (event) => {
    event.preventDefault();
    running?.abort();
    running = new AbortController();
    status.clear();
    const chosen = targets.map((t) => t.querySelector("input")).filter((c) => c.checked).map((c) => c.value);
    if (!chosen.length) return status.error("target: choose the base model or an adapter");
    const sampling = Object.fromEntries(Object.entries(settings)
      .filter(([, input]) => input.value.trim() !== "").map(([name, input]) => [name, Number(input.value)]));
    replace(panes, chosen.map((model) => runPane(model, base, mode.value, prompt.value, sampling, running.signal)));
  } } },
  h("h1", {}, "Playground"),
  field("Prompt", prompt),
  h("div", { class: "row" }, field("Mode", mode), Object.entries(settings).map(([name, input]) => field(name, input))),
  h("fieldset", { class: "targets" }, h("legend", {}, "Models"), targets),
  h("button", { type: "submit" }, "Run"));
  replace(view, form, status.el, panes);
  return () => running?.abort();
}

// One model's pane: stream its answer, then its timings. Fails alone.
function runPane(model, base, mode, prompt, sampling, signal) {
  const output = h("pre", { class: "output" });
  const timing = h("p", { class: "timing muted" }, "waiting…");
  const pane = h("section", { class: "card pane", dataset: { model } },
    h("h2", {}, h("span", { class: "name" }, model), model === base ? h("small", {}, " base") : null), output, timing);
  const chat = mode === "chat";
  const body = {
    model, stream: true, stream_options: { include_usage: true }, ...sampling,
    ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt }),
  };
  (async () => {
    const start = performance.now();
    let first = null;
    let chunks = 0;
    let usage = null;
    for await (const data of sse(chat ? "/v1/chat/completions" : "/v1/completions", { method: "POST", json: body, signal })) {
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`${chunk.error.field ? `${chunk.error.field}: ` : ""}${chunk.error.message}`);
      usage = chunk.usage ?? usage;
      const text = chunk.choices?.[0] ? (chat ? chunk.choices[0].delta?.content : chunk.choices[0].text) : "";
      if (text) {
        first ??= performance.now();
        chunks += 1;
        output.textContent += text;
        timing.textContent = "streaming…";
      }
    }
    const seconds = (performance.now() - start) / 1000;
    const tokens = usage?.completion_tokens ?? chunks;
    timing.textContent = `${seconds.toFixed(2)} s in all, first token after ${first === null ? "–"
      : `${Math.round(first - start)} ms`}; ${tokens} tokens, ${(tokens / seconds).toFixed(1)} tokens/s`;
    pane.dataset.done = "1";
  })().catch((error) => {
    if (error.name === "AbortError") return;
    timing.className = "timing notice error";
    timing.textContent = error.message;
    pane.dataset.done = "1";
  });
  return pane;
}
