// The console's shell: sign-in, navigation and the hash router (#/adapters, #/jobs/ftjob-...).
// Each page is a module whose render(view, ...params) fills <main> and may return a
// function that stops what it started (a job's event stream) when the user navigates away.

import { api, ApiError, session, whenUnauthorized } from "./api.js";
import { field, h, notice, replace } from "./dom.js";
import * as adapters from "./adapters.js";
import * as jobs from "./jobs.js";
import * as operator from "./operator.js";
import * as playground from "./playground.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const who = document.getElementById("who");

const TENANT_PAGES = [["adapters", "Adapters"], ["jobs", "Fine-tuning"], ["playground", "Playground"]];
const ADMIN_PAGES = [["operator", "Operator"]];

let stopPage = null;
let signInMessage = "";

whenUnauthorized((error) => {
  session.signOut();
  signInMessage = `The server refused this key: ${error.message}`;
  location.hash = "#/signin";
  route();
});

// Which kind of key this is: a tenant's key (or none on a single-tenant server) lists
// models; the admin key is refused there (403) and lists tenants instead.
async function probe(key) {
  try {
    await api("/v1/models", { key });
    return "tenant";
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 403) throw error;
  }
  await api("/v1/admin/tenants", { key });
  return "admin";
}

function renderSignIn() {
  const key = h("input", { type: "password", name: "key", autocomplete: "off", placeholder: "vbs.… or the admin key" });
  const status = notice();
  if (signInMessage) status.error(signInMessage);
  const form = h("form", { class: "card narrow", on: { submit: async (event) => {
    event.preventDefault();
    status.clear();
    try {
      const role = await probe(key.value.trim());
      session.signIn(key.value.trim(), role);
      signInMessage = "";
      location.hash = role === "admin" ? "#/operator" : "#/adapters";
    } catch (error) {
      status.error(error);
    }
  } } },
  h("h1", {}, "Sign in"),
  h("p", {}, "Paste an API key: a tenant's key opens its adapters, jobs and playground; the admin key opens the operator view. "
    + "A single-tenant server needs no key: leave it empty. The key stays in this tab only."),
  field("API key", key),
  h("button", { type: "submit" }, "Sign in"),
  status.el);
  replace(view, form);
  key.focus();
}

function renderNav() {
  const role = session.role;
  const pages = role === "admin" ? ADMIN_PAGES : role === "tenant" ? TENANT_PAGES : [];
  const current = location.hash.split("/")[1];
  replace(nav, pages.map(([id, label]) =>
    h("a", { href: `#/${id}`, class: current === id ? "active" : undefined }, label)));
  const signOut = h("button", { class: "link", on: { click: () => {
    session.signOut();
    location.hash = "#/signin";
  } } }, "Sign out");
  replace(who, role ? [role === "admin" ? "operator" : session.key ? "tenant key" : "single-tenant", signOut] : []);
}

const PAGES = { adapters, jobs, playground, operator };

async function route() {
  if (stopPage) stopPage();
  stopPage = null;
  const [, page, ...params] = location.hash.split("/");
  renderNav();
  if (!session.role || page === "signin" || !PAGES[page]) {
    if (session.role && page !== "signin") {
      location.hash = session.role === "admin" ? "#/operator" : "#/adapters";
      return;
    }
    renderSignIn();
    return;
  }
  replace(view, h("p", { class: "muted" }, "Loading…"));
  try {
    stopPage = (await PAGES[page].render(view, ...params.map(decodeURIComponent))) ?? null;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // signed out already
    replace(view, h("p", { class: "notice error" }, error.message));
  }
}

// A single-tenant server answers without a key: open the console at once.
async function start() {
  if (!session.role) {
    try {
      await api("/v1/models", { key: "" });
      session.signIn("", "tenant");
    } catch {
      // needs a key: the sign-in form
    }
  }
  window.addEventListener("hashchange", route);
  route();
}

start();
