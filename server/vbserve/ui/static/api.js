// The console's only way to the server: the public HTTP API, with the pasted key as a
// Bearer token. The key lives in sessionStorage (gone when the tab closes) and is never
// put in a URL.

const KEY = "vbserve.key";
const ROLE = "vbserve.role";

export const session = {
  get key() { return sessionStorage.getItem(KEY) ?? ""; },
  get role() { return sessionStorage.getItem(ROLE); }, // "tenant", "admin" or null (signed out)
  signIn(key, role) { sessionStorage.setItem(KEY, key); sessionStorage.setItem(ROLE, role); },
  signOut() { sessionStorage.removeItem(KEY); sessionStorage.removeItem(ROLE); },
};

// What a 401 does (set by app.js): sign out and say why.
let onUnauthorized = () => {};
export function whenUnauthorized(handler) { onUnauthorized = handler; }

// An error as the API gives it: {"error": {"type", "message", "field"}}.
export class ApiError extends Error {
  constructor(status, error) {
    const field = error?.field ? `${error.field}: ` : "";
    super(`${field}${error?.message ?? `HTTP ${status}`}`);
    this.status = status;
    this.type = error?.type ?? "http_error";
  }
}

function headers(extra, key) {
  const h = new Headers(extra);
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

// fetch() with the session's key; throws ApiError on a non-2xx answer. `json` sends a JSON
// body, `body` anything else (FormData, a File). `raw` returns the Response itself.
export async function api(path, { method = "GET", json, body, raw = false, key = session.key, signal } = {}) {
  const extra = json === undefined ? {} : { "content-type": "application/json" };
  const response = await fetch(path, {
    method, signal, headers: headers(extra, key), body: json === undefined ? body : JSON.stringify(json),
  });
  if (!response.ok) {
    const error = await response.json().then((b) => b?.error, () => null);
    const failure = new ApiError(response.status, error);
    if (response.status === 401 && session.role && key === session.key) onUnauthorized(failure);
    throw failure;
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// Server-sent events from a POST or GET: EventSource cannot send an Authorization header,
// so this reads the stream itself. Yields each `data:` payload (a string) until the stream
// ends or `[DONE]`.
export async function* sse(path, options = {}) {
  const response = await api(path, { ...options, raw: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (!data.length) continue; // a keep-alive comment
      const payload = data.join("\n");
      if (payload === "[DONE]") return;
      yield payload;
    }
  }
}

// An authenticated download: fetch the bytes, then save them under the server's filename.
export async function download(path) {
  const response = await api(path, { raw: true });
  const disposition = response.headers.get("content-disposition") ?? "";
  const name = /filename="([^"]+)"/.exec(disposition)?.[1] ?? "download";
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
