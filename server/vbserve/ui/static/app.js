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
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin"; // hashchange renders it
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

const pagesOf = (role) => (role === "admin" ? ADMIN_PAGES : role === "tenant" ? TENANT_PAGES : []);

function renderNav() {
  const role = session.role;
  const pages = pagesOf(role);
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

let navigation = 0; // counts route() calls: a page whose render ends after the next one began is stale

async function route() {
  const current = ++navigation;
  if (stopPage) stopPage();
  stopPage = null;
  const [, page, ...params] = location.hash.split("/");
  renderNav();
  // A tenant's key cannot use the admin API, nor the admin key a tenant's routes.
  if (!session.role || page === "signin" || !pagesOf(session.role).some(([id]) => id === page)) {
    if (session.role && page !== "signin") {
      location.hash = session.role === "admin" ? "#/operator" : "#/adapters";
      return;
    }
    renderSignIn();
    return;
  }
  // Each visit renders into its own element: one that finishes loading after the user moved
  // on writes into a detached element, and stops what it started.
  const container = h("div", { class: "page" }, h("p", { class: "muted" }, "Loading…"));
  replace(view, container);
  try {
    const stop = (await PAGES[page].render(container, ...params.map(decodeURIComponent))) ?? null;
    if (current === navigation) stopPage = stop;
    else stop?.();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // signed out already
    replace(container, h("p", { class: "notice error" }, error.message));
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
