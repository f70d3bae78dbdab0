// The start page: sign in (a demo identity in development mode, else the link's token), then
// the consultation list for clinicians and coordinators; patients and trainees go to their room.

import { takeTokenFromFragment, token, claims, expired, setToken, signOut } from "../lib/auth.js";
import { api, ApiError, may } from "../lib/api.js";
import { h, byId, when, roleName, header, notice } from "./dom.js";
import { t, applyStatic } from "./i18n.js";

takeTokenFromFragment();
const main = byId("main");
/** @type {() => void} */
let rerender = () => {};

const STATUSES = ["requested", "accepted", "declined", "scheduled", "live", "opinion_pending", "signed", "archived", "cancelled", "aborted"];

function signOutButton() {
  return h("button", { id: "sign-out", text: t("signOut"), onclick: () => { signOut(); location.replace("/web/"); } });
}

function problem(/** @type {unknown} */ err) {
  if (err instanceof ApiError && err.status === 401) return t("err.apiExpired");
  if (err instanceof ApiError) return `${t("err.apiRefused")} ${err.message}`;
  return String(err);
}

async function start() {
  const c = claims();
  if (!token() || !c) return signIn();
  if (expired(c)) {
    signOut();
    header({ title: t("app"), rerender: start });
    main.replaceChildren(notice(t("err.linkTitle"), t("err.expired"), h("a", { class: "button", href: "/web/", text: t("signIn") })));
    return;
  }
  if (c.cid && ["resident", "guardian", "trainee"].includes(c.role)) {
    location.replace(`/web/room.html?c=${encodeURIComponent(c.cid)}`);
    return;
  }
  header({ title: t("list.title"), who: `${c.name} · ${roleName(c.role)} · ${c.org}`, extra: [signOutButton()], rerender: () => { applyStatic(document); start(); } });
  if (c.role === "admin") {
    main.replaceChildren(notice(t("admin.title"), t("admin.text")));
    return;
  }
  await consultationList(c.role);
}

async function signIn() {
  header({ title: t("signIn"), rerender: () => { applyStatic(document); signIn(); } });
  const response = await fetch("/dev/identities");
  if (!response.ok) {
    main.replaceChildren(notice(t("err.noLinkTitle"), t("err.noLink")));
    return;
  }
  const demo = await response.json();
  main.replaceChildren(h("section", { class: "signin", "aria-labelledby": "signin-title" },
    h("h2", { id: "signin-title", text: t("dev.title") }),
    h("p", { text: t("dev.text", { id: demo.consultation.id, reason: demo.consultation.reason }) }),
    h("ul", { class: "identities" }, ...demo.identities.map((/** @type {any} */ who) => h("li", {},
      h("button", { "data-role": who.role, onclick: () => { setToken(who.token); start(); } },
        h("strong", { text: who.name }), h("span", { text: ` ${roleName(who.role)} · ${who.org}` })))))));
}

/** @param {string} role */
async function consultationList(role) {
  const filters = { status: "", institution: "" };
  const list = h("div", { id: "consultations", "aria-live": "polite" });
  const statusSelect = h("select", { id: "filter-status", onchange: (/** @type {Event} */ e) => { filters.status = /** @type {HTMLSelectElement} */ (e.target).value; load(); } },
    h("option", { value: "", text: t("list.all") }), ...STATUSES.map((s) => h("option", { value: s, text: t(`status.${s}`) })));
  const institution = h("input", { id: "filter-institution", type: "search", onchange: (/** @type {Event} */ e) => { filters.institution = /** @type {HTMLInputElement} */ (e.target).value.trim(); load(); } });
  const canRequest = await may(role, "request_consultation");
  main.replaceChildren(
    h("section", { class: "filters", "aria-label": t("list.filters") },
      h("label", { for: "filter-status", text: t("list.status") }), statusSelect,
      h("label", { for: "filter-institution", text: t("list.institution") }), institution),
    canRequest ? requestForm(load) : null,
    list,
  );

  async function load() {
    try {
      const data = await api("/consultations", { query: { status: filters.status, institution: filters.institution, limit: "200" } });
      list.replaceChildren(...(data.items.length ? await Promise.all(data.items.map((/** @type {any} */ c) => card(c, role, load))) : [h("p", { text: t("list.none") })]));
    } catch (err) {
      list.replaceChildren(notice(t("err.apiTitle"), problem(err)));
    }
  }
  await load();
}

/** @param {any} c @param {string} role @param {() => void} reload */
async function card(c, role, reload) {
  const out = h("p", { class: "result", role: "status" });
  const run = async (/** @type {() => Promise<unknown>} */ step) => {
    try { await step(); reload(); } catch (err) { out.textContent = problem(err); }
  };
  const actions = [];
  if (c.status === "requested" && await may(role, "respond_to_request")) {
    actions.push(h("button", { text: t("list.accept"), onclick: () => run(() => api(`/consultations/${c.id}/accept`, { method: "POST", body: {} })) }));
  }
  if (["accepted", "scheduled", "opinion_pending"].includes(c.status) && await may(role, "schedule")) {
    const id = `when-${c.id}`;
    const input = h("input", { type: "datetime-local", id, required: true });
    actions.push(h("form", { class: "inline", onsubmit: (/** @type {Event} */ e) => {
      e.preventDefault();
      const value = /** @type {HTMLInputElement} */ (input).value;
      run(() => api(`/consultations/${c.id}/schedule`, { method: "POST", body: { scheduled_time: new Date(value).toISOString() } }));
    } }, h("label", { for: id, text: t("list.scheduleAt") }), input, h("button", { type: "submit", text: t("list.schedule") })));
  }
  if (!["archived", "cancelled", "aborted", "declined"].includes(c.status) && await may(role, "invite")) {
    actions.push(inviteForm(c, out));
  }
  if (["scheduled", "live"].includes(c.status) && await may(role, "join")) {
    actions.push(h("a", { class: "button primary", href: `/web/room.html?c=${encodeURIComponent(c.id)}`, text: t("list.openRoom") }));
  }
  if (await may(role, "view_record")) {
    actions.push(h("a", { class: "button", href: `/web/record.html?c=${encodeURIComponent(c.id)}`, text: t("list.openRecord") }));
  }
  return h("article", { class: "card", "data-consultation": c.id, "aria-labelledby": `title-${c.id}` },
    // A coordinator's view has no reason (null: it is clinical; see docs/domain.md).
    h("h3", { id: `title-${c.id}`, text: c.reason === null ? c.resident.display_name : `${c.resident.display_name} — ${c.reason}` }),
    h("p", { class: "meta", text: `${t(`kind.${c.kind}`)} · ${t(`status.${c.status}`)} · ${c.specialty} · ${c.inviting_institution} · ${t("list.scheduled")} ${when(c.scheduled_time)}` }),
    h("p", { class: "meta", text: `${t("list.team")}: ${c.team.map((/** @type {any} */ m) => `${m.name} (${roleName(m.role)})`).join(", ")}` }),
    h("div", { class: "actions" }, ...actions), out);
}

/** Invites for a phone: the link (its token rides in the fragment, which no server ever sees),
 * its QR code drawn by the server, a short code to read out, and when they expire. */
function inviteForm(/** @type {any} */ c, /** @type {HTMLElement} */ out) {
  const roleId = `invite-role-${c.id}`;
  const nameId = `invite-name-${c.id}`;
  const roles = c.kind === "teaching" ? ["trainee"] : ["resident", "guardian"];
  const select = h("select", { id: roleId }, ...roles.map((r) => h("option", { value: r, text: roleName(r) })));
  const name = h("input", { id: nameId, type: "text", maxlength: "100" });
  return h("form", { class: "inline", onsubmit: async (/** @type {Event} */ e) => {
    e.preventDefault();
    const role = /** @type {HTMLSelectElement} */ (select).value;
    const who = /** @type {HTMLInputElement} */ (name).value.trim();
    try {
      const invite = await api(`/consultations/${c.id}/invites`, { method: "POST", body: who ? { role, name: who } : { role } });
      out.replaceChildren(inviteView(role, invite));
    } catch (err) {
      out.textContent = problem(err);
    }
  } }, h("label", { for: roleId, text: t("list.inviteRole") }), select,
    h("label", { for: nameId, text: t("list.inviteName") }), name, h("button", { type: "submit", text: t("list.invite") }));
}

function inviteView(/** @type {string} */ role, /** @type {any} */ invite) {
  const link = invite.link;
  const field = h("input", { type: "text", readonly: true, value: link, class: "invite-link", "aria-label": t("list.inviteLink") });
  const copied = h("span", { role: "status" });
  // An <img> of the SVG document: shown, never run (the page's CSP allows data: images).
  const qr = h("img", { class: "invite-qr", src: `data:image/svg+xml;base64,${btoa(invite.qr_svg)}`, alt: t("list.qrAlt") });
  const joinPage = `${new URL(link).origin}/web/join.html`;
  return h("div", { class: "invite", "data-jti": invite.jti },
    h("p", { text: t("list.invited", { role: roleName(role), until: when(invite.expires_at) }) }),
    h("div", { class: "invite-parts" },
      qr,
      h("div", {},
        h("p", { class: "hint", text: t("list.codeHint", { page: joinPage }) }),
        h("p", { class: "invite-code", id: `code-${invite.jti}`, "aria-label": invite.short_code.split("").join(" "), text: invite.short_code }))),
    h("div", { class: "actions" }, field,
      h("button", { type: "button", text: t("list.copy"), onclick: async () => {
        /** @type {HTMLInputElement} */ (field).select();
        try { await navigator.clipboard.writeText(link); } catch { document.execCommand("copy"); }
        copied.textContent = t("list.copied");
      } }), copied));
}

/** The request form: the consultation, the resident and the invited team. */
function requestForm(/** @type {() => void} */ reload) {
  const field = (/** @type {string} */ name, /** @type {Record<string, any>} */ attrs = {}, label = `new.${name}`) => [
    h("label", { for: `new-${name}`, text: t(label) }),
    attrs.tag === "textarea" ? h("textarea", { id: `new-${name}`, name, rows: "3" }) : h("input", { id: `new-${name}`, name, type: "text", required: true, ...attrs }),
  ];
  const team = h("fieldset", { class: "team" }, h("legend", { text: t("new.team") }));
  const addMember = () => {
    const n = team.querySelectorAll(".member").length;
    team.append(h("div", { class: "member form-grid" },
      ...field(`team-user-${n}`, { placeholder: "demo-county-physician" }, "new.memberUser"),
      ...field(`team-name-${n}`, {}, "new.memberName"),
      h("label", { for: `new-team-role-${n}`, text: t("new.memberRole") }),
      h("select", { id: `new-team-role-${n}` }, ...["township_doctor", "county_physician", "provincial_specialist", "coordinator"].map((r) => h("option", { value: r, text: roleName(r) }))),
      ...field(`team-inst-${n}`, {}, "new.memberInstitution")));
  };
  const out = h("p", { class: "result", role: "status" });
  const form = h("form", { id: "new-consultation", onsubmit: async (/** @type {Event} */ e) => {
    e.preventDefault();
    const v = (/** @type {string} */ id) => /** @type {HTMLInputElement} */ (byId(`new-${id}`)).value.trim();
    const members = [...team.querySelectorAll(".member")].map((_, n) => ({
      user_id: v(`team-user-${n}`), name: v(`team-name-${n}`), role: v(`team-role-${n}`), institution: v(`team-inst-${n}`),
    }));
    try {
      await api("/consultations", { method: "POST", body: {
        kind: v("kind"), specialty: v("specialty"),
        resident: { pseudonym: v("pseudonym"), display_name: v("resident"), age: Number(v("age")), sex: v("sex") },
        reason: v("reason"), purpose: v("purpose"), case_summary: v("summary"),
        requested_specialty: v("specialty"), requested_title: v("rtitle"), team: members,
      } });
      out.textContent = t("new.done");
      /** @type {HTMLFormElement} */ (form).reset();
      reload();
    } catch (err) {
      out.textContent = problem(err);
    }
  } },
  h("div", { class: "form-grid" },
    h("label", { for: "new-kind", text: t("new.kind") }),
    h("select", { id: "new-kind" }, ...["consultation", "telementoring", "teaching"].map((k) => h("option", { value: k, text: t(`kind.${k}`) }))),
    ...field("specialty", { placeholder: "respiratory" }), ...field("rtitle", { placeholder: "主任医师" }),
    ...field("pseudonym"), ...field("resident"), ...field("age", { type: "number", min: "0", max: "130" }),
    h("label", { for: "new-sex", text: t("new.sex") }),
    h("select", { id: "new-sex" }, ...["female", "male", "other", "unknown"].map((s) => h("option", { value: s, text: t(`sex.${s}`) }))),
    ...field("reason"), ...field("purpose"), ...field("summary", { tag: "textarea" })),
  team, h("button", { type: "button", text: t("new.addMember"), onclick: addMember }),
  h("button", { type: "submit", class: "primary", text: t("new.submit") }), out);
  addMember();
  return h("details", { class: "new" }, h("summary", { text: t("new.title") }), form);
}

rerender = start;
applyStatic(document);
start();
