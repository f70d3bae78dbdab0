// A small element builder and shared page pieces (header, messages).

import { t, lang, setLang, LANGS } from "./i18n.js";

/**
 * @param {string} tag
 * @param {Record<string, any>} [attrs] `text`, `class`, `on<event>` handlers, properties
 *   (value, checked, disabled, hidden) and attributes (everything else)
 * @param {...(Node | string | null | undefined | false)} children
 * @returns {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else if (key === "class") el.className = value;
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (["value", "checked", "disabled", "hidden", "selected"].includes(key)) /** @type {any} */ (el)[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child) el.append(child);
  return el;
}

/** @param {string} id */
export function byId(id) {
  return /** @type {HTMLElement} */ (document.getElementById(id));
}

/** A local date-time for people. @param {string | null | undefined} iso */
export function when(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString(lang(), { dateStyle: "short", timeStyle: "medium" });
}

/** Role value to its name in the chosen language. @param {string} role */
export function roleName(role) {
  return t(`role.${role}`);
}

/** The language switch: re-renders through `rerender` (no reload: a call stays up). */
export function languageSwitch(/** @type {() => void} */ rerender) {
  const select = h("select", { "aria-label": t("language"), id: "lang-select" },
    ...LANGS.map(([code, label]) => h("option", { value: code, text: label, selected: code === lang() })));
  select.addEventListener("change", () => {
    setLang(/** @type {HTMLSelectElement} */ (select).value);
    rerender();
  });
  return select;
}

/** Fills the page header: title, the signed-in person, language, sign out. */
export function header(/** @type {{title: string, who?: string, extra?: Node[], rerender: () => void}} */ o) {
  const bar = byId("header");
  bar.replaceChildren(
    h("h1", { text: o.title }),
    h("div", { class: "header-end" },
      o.who ? h("span", { class: "who", text: o.who }) : null,
      ...(o.extra ?? []),
      languageSwitch(o.rerender)),
  );
  document.title = `${o.title} — ${t("app")}`;
}

/** A message in place of the page: for refused links, expired tokens and ended sessions. */
export function notice(/** @type {string} */ title, /** @type {string} */ text, /** @type {Node[]} */ ...actions) {
  return h("section", { class: "notice", role: "alert" },
    h("h2", { text: title }), h("p", { text }), h("div", { class: "actions" }, ...actions));
}
