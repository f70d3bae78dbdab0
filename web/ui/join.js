// The page where a resident types the short code the village doctor read out; the server
// exchanges it for the invitation link, which this page then opens.

import { h, byId, header } from "./dom.js";
import { t, applyStatic } from "./i18n.js";

const main = byId("main");

/** The sentence for a refusal of POST /api/v1/invites/redeem. */
function refusal(/** @type {number} */ status, /** @type {any} */ problem, /** @type {string | null} */ retryAfter) {
  if (status === 400) return t("join.bad");
  if (status === 404) return t("join.unknown");
  if (status === 410) return t(String(problem?.detail ?? "").includes("withdrawn") ? "err.revoked" : "err.expired");
  if (status === 429) return t("join.tooMany", { minutes: Math.max(1, Math.ceil(Number(retryAfter ?? 60) / 60)) });
  return t("join.failed", { reason: problem?.detail ?? String(status) });
}

async function redeem(/** @type {string} */ code) {
  const response = await fetch("/api/v1/invites/redeem", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ code }),
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error(refusal(response.status, data, response.headers.get("Retry-After")));
  return data;
}

// A code given in the address (/join?code=…) fills the field, and leaves the address bar.
const prefill = new URLSearchParams(location.search).get("code") ?? "";
if (prefill) history.replaceState(null, "", location.pathname);

function render() {
  const input = /** @type {HTMLInputElement} */ (h("input", { id: "code", name: "code", type: "text", required: true,
    maxlength: "24", autocomplete: "one-time-code", autocapitalize: "characters", spellcheck: "false",
    placeholder: "K7QM-3XRD", "aria-describedby": "code-hint", value: prefill }));
  const error = h("p", { id: "code-error", class: "error", role: "alert" });
  const button = h("button", { type: "submit", class: "primary", id: "code-submit", text: t("join.submit") });
  const form = h("form", { onsubmit: async (/** @type {Event} */ e) => {
    e.preventDefault();
    error.textContent = "";
    button.setAttribute("disabled", "");
    try {
      const invite = await redeem(input.value);
      location.assign(invite.link);
    } catch (err) {
      error.textContent = String(/** @type {any} */ (err)?.message ?? err);
      button.removeAttribute("disabled");
      input.focus();
    }
  } },
    h("label", { for: "code", text: t("join.label") }), input,
    h("p", { id: "code-hint", class: "hint", text: t("join.hint") }), error, button);
  main.replaceChildren(h("section", { class: "join-code", "aria-labelledby": "join-title" },
    h("h2", { id: "join-title", text: t("join.title") }), h("p", { text: t("join.intro") }), form));
  input.focus();
}

function page() {
  header({ title: t("join.heading"), rerender: () => { applyStatic(document); page(); } });
  render();
}

applyStatic(document);
page();
