// The record of a consultation: sessions and who took part when, the timeline, consents, chat,
// the opinion (versions, signing, amendments), the final decision, the FHIR export and the
// composite recording.

import { takeTokenFromFragment, token, claims } from "../lib/auth.js";
import { api, ApiError, may } from "../lib/api.js";
import { h, byId, when, roleName, header, notice } from "./dom.js";
import { t, applyStatic } from "./i18n.js";

takeTokenFromFragment();
const cid = new URLSearchParams(location.search).get("c") ?? "";
const who = claims();
const main = byId("main");

function problem(/** @type {unknown} */ err) {
  if (err instanceof ApiError && err.status === 401) return t("err.apiExpired");
  if (err instanceof ApiError) return `${t("err.apiRefused")} ${err.message}`;
  return String(err);
}

function table(/** @type {string[]} */ heads, /** @type {(string | Node)[][]} */ rows, /** @type {string} */ id) {
  return h("table", { id },
    h("thead", {}, h("tr", {}, ...heads.map((x) => h("th", { scope: "col", text: x })))),
    h("tbody", {}, ...rows.map((r) => h("tr", {}, ...r.map((c) => h("td", {}, c))))));
}

async function start() {
  header({ title: t("rec.title"), who: who ? `${who.name} · ${roleName(who.role)} · ${who.org}` : "",
    extra: [h("a", { class: "button", href: "/web/", text: t("toList") })],
    rerender: () => { applyStatic(document); start(); } });
  if (!token() || !cid) {
    main.replaceChildren(notice(t("err.noLinkTitle"), t("err.noLink")));
    return;
  }
  /** @type {any} */
  let record;
  try {
    record = await api(`/consultations/${encodeURIComponent(cid)}/record`);
  } catch (err) {
    main.replaceChildren(notice(t("err.apiTitle"), problem(err)));
    return;
  }
  const role = who?.role ?? "";
  const c = record.consultation;
  const names = new Map([...record.participations.map((/** @type {any} */ p) => [p.user_id, p.name]), ...c.team.map((/** @type {any} */ m) => [m.user_id, m.name])]);
  const sections = [
    h("section", { "aria-labelledby": "summary-title" },
      h("h2", { id: "summary-title", text: `${c.resident.display_name} — ${c.reason}` }),
      h("p", { text: `${t(`kind.${c.kind}`)} · ${t(`status.${c.status}`)} · ${c.specialty} · ${c.inviting_institution}` }),
      h("p", { text: `${t("rec.purpose")}: ${c.purpose}` }),
      c.case_summary ? h("p", { text: `${t("rec.summary")}: ${c.case_summary}` }) : null,
      h("p", { text: `${t("list.team")}: ${c.team.map((/** @type {any} */ m) => `${m.name} (${roleName(m.role)}, ${m.institution})`).join(", ")}` })),
    h("section", { "aria-labelledby": "sessions-title" },
      h("h2", { id: "sessions-title", text: t("rec.sessions") }),
      ...record.sessions.map((/** @type {any} */ s) => h("div", { class: "session" },
        h("h3", { text: t("rec.session", { n: s.number, start: when(s.started_at), end: when(s.ended_at) }) }),
        table([t("rec.name"), t("rec.role"), t("rec.device"), t("rec.joined"), t("rec.leftAt"), t("rec.reason")],
          record.participations.filter((/** @type {any} */ p) => p.session_id === s.id).map((/** @type {any} */ p) =>
            [p.name, roleName(p.role), p.device, when(p.joined_at), when(p.left_at), p.close_reason ? t(`reason.${p.close_reason}`) : "—"]), `participants-${s.number}`)))),
    recordingsSection(record),
    h("section", { "aria-labelledby": "consents-title" },
      h("h2", { id: "consents-title", text: t("rec.consents") }),
      record.consents.length
        ? table([t("rec.when"), t("rec.kind"), t("rec.value"), t("rec.givenBy")], record.consents.map((/** @type {any} */ k) =>
          [when(k.at), t(`consent.${k.kind}`), t(k.granted ? "consent.given" : "consent.withdrawn"), names.get(k.given_by) ?? k.given_by]), "consents")
        : h("p", { text: t("rec.none") })),
    h("section", { "aria-labelledby": "chat-title" },
      h("h2", { id: "chat-title", text: t("chat.title") }),
      h("ol", { class: "chat-log", id: "record-chat" }, ...record.events.filter((/** @type {any} */ e) => e.kind === "chat").map((/** @type {any} */ e) =>
        h("li", {}, h("span", { class: "chat-who", text: `${e.data.name ?? ""} ${when(e.at)}` }), h("p", { class: "chat-text", text: e.data.text }))))),
    h("section", { "aria-labelledby": "timeline-title" },
      h("h2", { id: "timeline-title", text: t("rec.timeline") }),
      h("ol", { class: "timeline", id: "timeline" }, ...record.events.map((/** @type {any} */ e) =>
        h("li", {}, h("time", { datetime: e.at, text: when(e.at) }), ` ${t(`event.${e.kind}`)} `, h("span", { class: "meta", text: describe(e, names) }))))),
    await opinionSection(record, role),
    await decisionSection(record, role),
  ];
  if (await may(role, "export_record")) sections.push(fhirSection());
  main.replaceChildren(...sections.filter(Boolean).map((s) => /** @type {Node} */ (s)));
}

function describe(/** @type {any} */ e, /** @type {Map<string, string>} */ names) {
  const actor = e.actor ? names.get(e.actor) ?? e.actor : "";
  const d = e.data ?? {};
  if (e.kind === "chat") return `${actor}: ${d.text}`;
  if (e.kind === "left") return `${actor} (${t(`reason.${d.reason}`)})`;
  if (e.kind === "consent") return `${actor}: ${t(`consent.${d.kind}`)} ${t(d.granted ? "consent.given" : "consent.withdrawn")}`;
  if (e.kind === "annotation") return `${actor}: ${d.clear ? t("tile.clear") : t("rec.stroke", { n: (d.points ?? []).length })}`;
  return actor;
}

/** Whether a recorded session's composite is still to come (rendering, or not begun yet). */
function compositePending(/** @type {any[]} */ recordings) {
  const recorded = new Set(recordings.filter((r) => r.kind === "track").map((r) => r.session_id));
  const composites = recordings.filter((r) => r.kind === "composite");
  return composites.some((r) => r.state === "rendering")
    || [...recorded].some((sid) => !composites.some((r) => r.session_id === sid));
}

function recordingsSection(/** @type {any} */ record) {
  const section = h("section", { id: "recordings-section", "aria-labelledby": "recordings-title" });
  const player = /** @type {HTMLVideoElement} */ (h("video", { controls: true, id: "playback", hidden: true, preload: "metadata", "aria-label": t("rec.player") }));
  const out = h("p", { class: "result", role: "status" });
  const list = h("div", {});
  const fill = (/** @type {any[]} */ recordings) => {
    const composites = recordings.filter((r) => r.kind === "composite");
    const items = composites.map((r) => h("li", { "data-recording": r.id, "data-state": r.state },
      h("span", { text: `${when(r.started_at)} · ` }),
      ...(r.state === "complete"
        ? [h("span", { text: r.duration_s ? `${Math.round(r.duration_s)} s ` : "" }),
          h("button", { class: "play", text: t("rec.play"), onclick: () => play(r.id) })]
        : [h("span", { class: "meta", text: r.state === "rendering"
          ? t("rec.rendering", { pct: Math.round((r.progress ?? 0) * 100) })
          : t("rec.failed") })])));
    const pending = compositePending(recordings) && !composites.some((r) => r.state === "rendering");
    if (pending) items.push(h("li", { "data-state": "pending" }, h("span", { class: "meta", text: t("rec.pending") })));
    list.replaceChildren(items.length ? h("ul", { id: "recordings" }, ...items) : h("p", { text: t("rec.noRecordings") }));
  };
  const play = async (/** @type {string} */ id) => {
    try {
      // A <video> cannot send an Authorization header: the server gives a short-lived link.
      const { url } = await api(`/recordings/${encodeURIComponent(id)}/playback`, { method: "POST", body: {} });
      player.src = url;
      player.hidden = false;
      await player.play();
    } catch (err) {
      out.textContent = problem(err);
    }
  };
  // The composite is made after the session ends: follow its progress until it is ready.
  const poll = async () => {
    if (!section.isConnected) return;
    try {
      const fresh = await api(`/consultations/${encodeURIComponent(cid)}/record`);
      fill(fresh.recordings);
      if (compositePending(fresh.recordings)) setTimeout(poll, 2000);
    } catch (err) {
      out.textContent = problem(err);
    }
  };
  fill(record.recordings);
  if (compositePending(record.recordings)) setTimeout(poll, 2000);
  section.append(h("h2", { id: "recordings-title", text: t("rec.recordings") }), list, player, out);
  return section;
}

async function opinionSection(/** @type {any} */ record, /** @type {string} */ role) {
  const versions = record.opinions;
  const newest = versions[versions.length - 1];
  const anySigned = versions.some((/** @type {any} */ o) => o.signatures.length);
  const out = h("p", { class: "result", role: "status" });
  const items = [h("h2", { id: "opinion-title", text: t("op.title") })];
  for (const o of versions) {
    items.push(h("article", { class: "opinion", "data-version": String(o.version) },
      h("h3", { text: t("op.version", { n: o.version, at: when(o.created_at) }) }),
      o.amendment_reason ? h("p", { text: `${t("op.amendmentReason")}: ${o.amendment_reason}` }) : null,
      ...["findings", "assessment", "recommendations", "referral_advice"].map((k) => h("p", {}, h("strong", { text: `${t(`op.${k}`)}: ` }), o[k] || "—")),
      h("p", { class: "meta", text: o.signatures.length
        ? o.signatures.map((/** @type {any} */ s) => t("op.signedBy", { name: s.signer_name, at: when(s.signed_at) })).join("; ")
        : t("op.unsigned") })));
  }
  if (!versions.length) items.push(h("p", { text: t("op.none") }));
  const writable = ["opinion_pending", "signed", "live"].includes(record.consultation.status);
  if (writable && newest && await may(role, "sign_opinion") && !newest.signatures.some((/** @type {any} */ s) => s.signer === who?.sub)) {
    items.push(h("button", { id: "sign", class: "primary", text: t("op.sign", { n: newest.version }), onclick: async () => {
      try { await api(`/consultations/${cid}/opinions/sign`, { method: "POST", body: { version: newest.version } }); start(); } catch (err) { out.textContent = problem(err); }
    } }));
  }
  if (writable && await may(role, "write_opinion")) {
    const area = (/** @type {string} */ k, required = true) => [h("label", { for: `op-${k}`, text: t(`op.${k}`) }),
      h("textarea", { id: `op-${k}`, rows: "3", required, value: newest?.[k] ?? "" })];
    const form = h("form", { id: "opinion-form", onsubmit: async (/** @type {Event} */ e) => {
      e.preventDefault();
      const v = (/** @type {string} */ k) => /** @type {HTMLTextAreaElement} */ (byId(`op-${k}`)).value.trim();
      /** @type {Record<string, string>} */
      const body = { findings: v("findings"), assessment: v("assessment"), recommendations: v("recommendations"), referral_advice: v("referral_advice") };
      if (anySigned) body.amendment_reason = v("amendment_reason");
      try { await api(`/consultations/${cid}/opinions`, { method: "POST", body }); start(); } catch (err) { out.textContent = problem(err); }
    } }, h("h3", { text: anySigned ? t("op.amend") : t("op.write") }),
      h("div", { class: "form-grid" }, ...area("findings"), ...area("assessment"), ...area("recommendations"), ...area("referral_advice", false),
        ...(anySigned ? area("amendment_reason") : [])),
      h("button", { type: "submit", class: "primary", text: anySigned ? t("op.saveAmendment") : t("op.save") }));
    items.push(form);
  }
  items.push(out);
  return h("section", { "aria-labelledby": "opinion-title" }, ...items);
}

async function decisionSection(/** @type {any} */ record, /** @type {string} */ role) {
  const out = h("p", { class: "result", role: "status" });
  const items = [h("h2", { id: "decision-title", text: t("dec.title") }),
    ...record.decisions.map((/** @type {any} */ d) => h("p", { class: "decision", text: `${when(d.at)} · ${d.decision}` }))];
  if (!record.decisions.length) items.push(h("p", { text: t("dec.none") }));
  const signed = record.opinions.some((/** @type {any} */ o) => o.signatures.length);
  if (signed && await may(role, "record_decision")) {
    items.push(h("form", { id: "decision-form", onsubmit: async (/** @type {Event} */ e) => {
      e.preventDefault();
      const decision = /** @type {HTMLTextAreaElement} */ (byId("decision-text")).value.trim();
      try { await api(`/consultations/${cid}/decision`, { method: "POST", body: { decision } }); start(); } catch (err) { out.textContent = problem(err); }
    } }, h("label", { for: "decision-text", text: t("dec.label") }), h("textarea", { id: "decision-text", rows: "3", required: true }),
      h("button", { type: "submit", class: "primary", text: t("dec.save") })));
  }
  items.push(out);
  return h("section", { "aria-labelledby": "decision-title" }, ...items);
}

function fhirSection() {
  const out = h("p", { class: "result", role: "status" });
  return h("section", { "aria-labelledby": "fhir-title" },
    h("h2", { id: "fhir-title", text: t("fhir.title") }),
    h("button", { id: "fhir", text: t("fhir.download"), onclick: async () => {
      try {
        const bundle = await api(`/consultations/${encodeURIComponent(cid)}/fhir`);
        const url = URL.createObjectURL(new Blob([JSON.stringify(bundle, null, 2)], { type: "application/fhir+json" }));
        const link = h("a", { href: url, download: `${cid}.fhir.json`, text: `${cid}.fhir.json` });
        out.replaceChildren(link);
        link.click();
      } catch (err) {
        out.textContent = problem(err);
      }
    } }), out);
}

applyStatic(document);
start();
