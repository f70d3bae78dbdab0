// The consultation room: before joining (devices, preview), the waiting room, and the room
// itself. The protocol and the peer connections live in ../lib; this module draws and listens.

import { takeTokenFromFragment, token, claims, expired, deviceLabel } from "../lib/auth.js";
import { rolePermissions } from "../lib/api.js";
import { Signaling, SignalError } from "../lib/signaling.js";
import { Publisher, Subscriber } from "../lib/peers.js";
import { inbound, ownAudioLevel, roundTrip, grade } from "../lib/stats.js";
import { checkNetwork } from "../lib/netcheck.js";
import { h, byId, when, roleName, header, notice } from "./dom.js";
import { t, applyStatic } from "./i18n.js";

/**
 * @typedef {{participant_id: string, user_id: string, name: string, role: string, org: string,
 *   device: string, state: string, joined_at: string, hand_raised: boolean, audio_muted: boolean,
 *   video_muted: boolean, connected: boolean}} Participant
 * @typedef {{kind: string, granted: boolean, given_by: string, on_behalf_of: string, at: string}} Consent
 * @typedef {{points: number[][], colour: string, width: number}} Stroke
 * @typedef {{el: HTMLElement, video: HTMLVideoElement, canvas: HTMLCanvasElement, label: HTMLElement,
 *   participant: string, source: string, trackId?: string, frames: number, still: number}} Tile
 * @typedef {import("../lib/peers.js").Received} Received
 */

takeTokenFromFragment();
const cid = new URLSearchParams(location.search).get("c") ?? "";
const who = claims();
const main = byId("main");

/** Everything the room knows; rebuilt from each `joined` snapshot. */
const state = {
  /** @type {Set<string>} */ perms: new Set(),
  /** @type {Participant | null} */ me: null,
  kind: "consultation",
  /** @type {Map<string, Participant>} */ participants: new Map(),
  /** @type {Map<string, Participant>} */ waiting: new Map(),
  /** @type {any[]} */ chat: [],
  /** @type {Consent[]} */ consents: [],
  traineeChat: false,
  /** @type {{by: string, at: string} | null} */ recording: null,
  /** @type {Map<string, Tile>} */ tiles: new Map(),
  /** @type {Map<string, HTMLAudioElement>} */ audios: new Map(),
  /** @type {Map<string, Stroke[]>} */ strokes: new Map(),
  /** @type {string | null} */ ownCameraTrack: null,
  drawing: false,
  /** @type {Received[]} */ received: [],
  quality: /** @type {import("../lib/stats.js").Quality} */ ("unknown"),
  camera: /** @type {MediaStreamTrack | null} */ (null),
  microphone: /** @type {MediaStreamTrack | null} */ (null),
  screen: /** @type {MediaStreamTrack | null} */ (null),
  second: /** @type {MediaStreamTrack | null} */ (null),
  cameraId: "",
  micId: "",
  micOn: true,
  camOn: true,
  phase: "start",
  /** @type {Promise<import("../lib/netcheck.js").NetworkCheck> | null} */ netCheck: null,
  /** @type {RTCIceServer[]} */ iceServers: [],
  // The video quality chosen in the toolbar, for every video received (those that come later
  // too; the server remembers it for the media connections it belongs to).
  layer: "auto",
};

/** @type {Signaling} */ let sig;
/** @type {Publisher | null} */ let publisher = null;
/** @type {Subscriber | null} */ let subscriber = null;
/** @type {(() => void) | null} */ let rerenderPage = null;

const can = (/** @type {string} */ p) => state.perms.has(p);
const mayPublish = () => can("publish_video") || can("publish_audio");

/** A short message for screen readers and sighted users alike. */
function say(/** @type {string} */ text) {
  const live = byId("live");
  live.textContent = text;
  const toast = byId("toast");
  toast.textContent = text;
  toast.hidden = false;
  clearTimeout(/** @type {any} */ (toast).timer);
  /** @type {any} */ (toast).timer = setTimeout(() => { toast.hidden = true; }, 6000);
}

function errorText(/** @type {unknown} */ err) {
  if (err instanceof SignalError) {
    const known = t(`code.${err.code}`);
    return known === `code.${err.code}` ? err.message : known;
  }
  return String(/** @type {any} */ (err)?.message ?? err);
}

/** Runs a request; a refusal becomes a message instead of an exception. */
async function act(/** @type {string} */ event, /** @type {Record<string, unknown>} */ payload = {}) {
  try {
    return await sig.request(event, payload);
  } catch (err) {
    say(errorText(err));
    return null;
  }
}

function connectRefusal(/** @type {string} */ reason) {
  if (reason === "token expired") return t("err.expired");
  if (reason === "token is scoped to another consultation") return t("err.otherConsultation");
  if (reason === "invite has been revoked") return t("err.revoked");
  return t("err.refused", { reason });
}

function showNotice(/** @type {string} */ title, /** @type {string} */ text, withRecord = false) {
  state.phase = "over";
  stopMedia();
  const actions = [h("a", { href: "/web/", class: "button", text: t("toList") })];
  if (withRecord && can("view_record") && who?.role !== "trainee") {
    actions.push(h("a", { href: `/web/record.html?c=${encodeURIComponent(cid)}`, class: "button", text: t("openRecord") }));
  }
  main.replaceChildren(notice(title, text, ...actions));
  rerenderPage = null;
}

function pageHeader() {
  const extra = [];
  if (state.phase === "room") {
    extra.push(h("span", { id: "rec-indicator", class: "rec", role: "status", hidden: !state.recording,
      text: state.recording ? t("room.recordingOn") : "" }));
    extra.push(h("span", { id: "quality", class: `quality q-${state.quality}`, role: "status",
      text: t(`quality.${state.quality}`) }));
  }
  header({
    title: t("room.title"),
    who: who ? `${who.name} · ${roleName(who.role)} · ${who.org}` : "",
    extra,
    rerender: () => { applyStatic(document); pageHeader(); rerenderPage?.(); },
  });
}

// --- start: token, connection, devices --------------------------------------------------------

async function start() {
  const jwt = token();
  if (!jwt || !who || !cid) {
    pageHeader();
    showNotice(t("err.noLinkTitle"), t("err.noLink"));
    return;
  }
  pageHeader();
  if (expired(who)) {
    showNotice(t("err.linkTitle"), t("err.expired"));
    return;
  }
  state.perms = new Set((await rolePermissions())[who.role] ?? []);
  sig = new Signaling({ token: jwt, consultationId: cid, device: deviceLabel() });
  listen();
  try {
    await sig.connect();
  } catch (err) {
    showNotice(t("err.linkTitle"), connectRefusal(/** @type {Error} */ (err).message));
    return;
  }
  await prejoin();
}

async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  return {
    cameras: devices.filter((d) => d.kind === "videoinput"),
    mics: devices.filter((d) => d.kind === "audioinput"),
  };
}

async function openCamera(/** @type {string} */ deviceId) {
  const stream = await navigator.mediaDevices.getUserMedia({
    video: deviceId ? { deviceId: { exact: deviceId } } : { width: { ideal: 640 }, height: { ideal: 480 } },
  });
  return stream.getVideoTracks()[0];
}

async function openMic(/** @type {string} */ deviceId) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: deviceId ? { deviceId: { exact: deviceId } } : true });
  return stream.getAudioTracks()[0];
}

async function prejoin() {
  state.phase = "prejoin";
  const invitee = who?.role === "resident" || who?.role === "guardian";
  const render = async () => {
    /** @type {Node[]} */
    const body = [h("h2", { text: t("pre.title") })];
    if (mayPublish()) {
      try {
        if (!state.camera && can("publish_video")) state.camera = await openCamera(state.cameraId);
        if (!state.microphone && can("publish_audio")) state.microphone = await openMic(state.micId);
      } catch (err) {
        body.push(h("p", { class: "error", role: "alert", text: t("pre.noDevices", { reason: String(/** @type {any} */ (err)?.message ?? err) }) }));
      }
      const { cameras, mics } = await listDevices();
      const preview = /** @type {HTMLVideoElement} */ (h("video", { autoplay: true, muted: true, playsinline: true, class: "preview", "aria-label": t("pre.preview") }));
      if (state.camera) preview.srcObject = new MediaStream([state.camera]);
      const camSelect = h("select", { id: "camera-select", onchange: async (/** @type {Event} */ e) => {
        state.cameraId = /** @type {HTMLSelectElement} */ (e.target).value;
        state.camera?.stop();
        state.camera = await openCamera(state.cameraId);
        preview.srcObject = new MediaStream([state.camera]);
      } }, ...cameras.map((d, i) => h("option", { value: d.deviceId, text: d.label || `${t("pre.camera")} ${i + 1}`, selected: d.deviceId === state.camera?.getSettings().deviceId })));
      const micSelect = h("select", { id: "mic-select", onchange: async (/** @type {Event} */ e) => {
        state.micId = /** @type {HTMLSelectElement} */ (e.target).value;
        state.microphone?.stop();
        state.microphone = await openMic(state.micId);
        meterFor(meter);
      } }, ...mics.map((d, i) => h("option", { value: d.deviceId, text: d.label || `${t("pre.microphone")} ${i + 1}`, selected: d.deviceId === state.microphone?.getSettings().deviceId })));
      const meter = /** @type {HTMLMeterElement} */ (h("meter", { min: "0", max: "1", value: "0", id: "mic-meter", "aria-label": t("pre.level") }));
      meterFor(meter);
      const devices = h("div", { class: "form-grid" },
        h("label", { for: "camera-select", text: t("pre.camera") }), camSelect,
        h("label", { for: "mic-select", text: t("pre.microphone") }), micSelect,
        h("span", { text: t("pre.level") }), meter);
      if (invitee) {
        // A resident or guardian is asked for nothing but the camera and microphone here (and
        // consent once let in): the choices and the network check are there, folded away.
        body.push(h("p", { id: "pre-invitee", text: t("pre.invitee") }), preview,
          h("details", { class: "pre-settings" }, h("summary", { text: t("pre.settings") }), devices, netCheckView()));
      } else {
        body.push(preview, devices);
      }
    } else {
      body.push(h("p", { text: t("pre.watchOnly") }));
    }
    if (!invitee || !mayPublish()) body.push(netCheckView());
    const joinButton = h("button", { id: "join", class: "primary", text: t("pre.join"), onclick: () => { joinButton.setAttribute("disabled", ""); join(); } });
    body.push(joinButton);
    main.replaceChildren(h("section", { class: "prejoin", "aria-labelledby": "pre-title" }, ...body));
    body[0] instanceof HTMLElement && body[0].setAttribute("id", "pre-title");
  };
  rerenderPage = () => { if (state.phase === "prejoin") render(); };
  await render();
}

/** The network check's result on the pre-join page; it runs once, re-renders show it again. */
function netCheckView() {
  const out = h("p", { id: "net-check", role: "status", "data-state": "running", text: t("net.running") });
  state.netCheck ??= checkNetwork();
  state.netCheck.then((r) => {
    const server = r.rttMs === null ? t("net.noServer") : t("net.server", { ms: Math.round(r.rttMs) });
    const media = r.candidates ? t("net.media", { n: r.candidates }) : t("net.noMedia");
    const ok = r.rttMs !== null && r.candidates > 0;
    out.textContent = `${t(ok ? "net.ok" : "net.problem")} ${server} ${media}`;
    out.className = ok ? "net-ok" : "error";
    out.dataset.state = "done";
    out.dataset.rtt = r.rttMs === null ? "" : String(r.rttMs);
    out.dataset.candidates = String(r.candidates);
  });
  return out;
}

/** A live level meter of the chosen microphone, from the Web Audio analyser. */
function meterFor(/** @type {HTMLMeterElement} */ meter) {
  if (!state.microphone) return;
  const context = new AudioContext();
  const source = context.createMediaStreamSource(new MediaStream([state.microphone]));
  const analyser = context.createAnalyser();
  source.connect(analyser);
  const data = new Float32Array(analyser.fftSize);
  const tick = () => {
    if (!meter.isConnected || state.phase !== "prejoin") { context.close(); return; }
    analyser.getFloatTimeDomainData(data);
    meter.value = Math.min(1, Math.sqrt(data.reduce((s, x) => s + x * x, 0) / data.length) * 4);
    requestAnimationFrame(tick);
  };
  tick();
}

async function join() {
  while (true) {
    try {
      subscriber ??= newSubscriber();
      await sig.join();
      return;
    } catch (err) {
      // Join pressed while the socket is reconnecting: join once it is back.
      if (err instanceof SignalError && err.code === "disconnected") {
        await sig.next("_connected");
        continue;
      }
      if (err instanceof SignalError && (err.code === "session_not_started" || err.code === "busy")) {
        // Nothing announces a session's start: ask again.
        main.replaceChildren(notice(t("pre.notStartedTitle"), t("pre.notStarted")));
        await new Promise((r) => setTimeout(r, 3000));
        continue;
      }
      showNotice(t("err.joinTitle"), errorText(err));
      return;
    }
  }
}

function newSubscriber() {
  const s = new Subscriber(sig);
  s.addEventListener("tracks", (e) => { state.received = /** @type {CustomEvent} */ (e).detail; syncTracks(); });
  // The subscribe connection is replaced when the server's side was gone: watch each one.
  s.addEventListener("connectionstatechange", () => watchMedia(s.pc));
  return s;
}

// --- connection changes (docs/protocol.md, Connection changes) -------------------------------
// The network under the page changes (a new address, a few seconds offline): ICE restarts on
// the same peer connections, the seat stays, nobody else notices. Never a new join for it.

const media = {
  /** @type {Set<RTCPeerConnection>} */ watched: new Set(),
  /** A restart is being sent. */ restarting: false,
  /** Restarts in a row that did not bring the media back. */ misses: 0,
  /** @type {any} */ watchdog: 0,
  /** ICE restarts sent, for tests. */ restarts: 0,
};
// The restart's requests double as a check of the socket: no answer by then, and it is dead
// too (an address change ends its TCP connection unnoticed).
const RESTART_ACK_MS = 5000;
// A restart that has not brought both connections back by then is tried again; after a few,
// the connections start afresh (a reconnect without keep_media).
const RESTART_WAIT_MS = 20000;
const RESTART_TRIES = 3;

function mediaConnections() {
  return [publisher?.pc, subscriber?.pc].filter((pc) => pc && pc.connectionState !== "closed");
}

const iceUp = (/** @type {RTCPeerConnection} */ pc) => pc.iceConnectionState === "connected" || pc.iceConnectionState === "completed";

/** Watches a peer connection's ICE: a failure or a lasting disconnection restarts it. */
function watchMedia(/** @type {RTCPeerConnection | undefined} */ pc) {
  if (!pc || media.watched.has(pc)) return;
  media.watched.add(pc);
  pc.addEventListener("iceconnectionstatechange", () => {
    const which = pc === publisher?.pc ? "publish" : "subscribe";
    console.info(`peer connection ${which}: ice ${pc.iceConnectionState}`);
    if (state.phase !== "room") return;
    if (pc.iceConnectionState === "failed") {
      mediaTrouble();
    } else if (pc.iceConnectionState === "disconnected") {
      // A short blip recovers by itself; a restart costs a renegotiation.
      setTimeout(() => { if (pc.iceConnectionState === "disconnected") mediaTrouble(); }, 2000);
    } else if (iceUp(pc)) {
      mediaRecovered();
    }
  });
}

function showMediaBanner(/** @type {boolean} */ on) {
  const banner = document.getElementById("media-reconnecting");
  if (banner) banner.hidden = !on;
}

/** Both connections carry media again. */
function mediaRecovered() {
  if (!mediaConnections().every((pc) => pc && iceUp(pc))) return;
  media.misses = 0;
  clearTimeout(media.watchdog);
  showMediaBanner(false);
}

/** A media connection went down: restart ICE over the socket as it is; if the socket is dead
 * too (no answer), reconnect it: the seat comes back with its media (see entered). */
function mediaTrouble() {
  if (state.phase !== "room") return;
  showMediaBanner(true);
  if (sig.connected) restartMedia();
  // Otherwise socket.io is reconnecting already, and the resumed seat restarts its media.
}

/** The browser's network changed: the socket is likely dead (its address went), unnoticed
 * until the heartbeat (45 s). Reconnect it now; the resumed seat restarts its media. */
function networkChanged() {
  if (state.phase !== "room" && state.phase !== "waiting") return;
  if (state.phase === "room") showMediaBanner(true);
  sig.reconnectNow();
}

/** ICE restarts on the publish connection and, asked of the server, on the subscribe one. */
async function restartMedia() {
  if (media.restarting || state.phase !== "room") return;
  media.restarting = true;
  showMediaBanner(true);
  clearTimeout(media.watchdog);
  try {
    media.restarts += 1;
    await Promise.all([
      publisher && publisher.pc.connectionState !== "closed" ? publisher.restartIce(RESTART_ACK_MS) : null,
      subscriber ? subscriber.restart(RESTART_ACK_MS) : null,
    ]);
  } catch (err) {
    console.warn("ICE restart", err);
    media.restarting = false;
    if (err instanceof SignalError && (err.code === "timeout" || err.code === "disconnected")) {
      sig.reconnectNow(); // the socket is dead too
    } else {
      restartAfresh(); // refused: this connection cannot restart
    }
    return;
  }
  media.restarting = false;
  // Until both connections are up again (ICE may stay "connected" through a restart, firing
  // no event), or the wait runs out: then again, and after a few times afresh.
  const until = Date.now() + RESTART_WAIT_MS;
  const check = () => {
    if (state.phase !== "room") return;
    if (mediaConnections().every((pc) => pc && iceUp(pc))) { mediaRecovered(); return; }
    if (Date.now() < until) { media.watchdog = setTimeout(check, 1000); return; }
    media.misses += 1;
    if (media.misses >= RESTART_TRIES) restartAfresh();
    else restartMedia();
  };
  media.watchdog = setTimeout(check, 1000);
}

/** The connections cannot recover: new ones, through a reconnect that does not keep them (the
 * room sees this seat's tracks end and come back). */
function restartAfresh() {
  media.misses = 0;
  clearTimeout(media.watchdog);
  say(t("room.mediaRestart"));
  sig.reconnectNow(false);
}

// --- announcements -----------------------------------------------------------------------------

function isMe(/** @type {Participant} */ p) {
  return p.user_id === who?.sub && p.device === sig.device;
}

function listen() {
  sig.on("waiting", ({ participant }) => {
    if (isMe(participant)) {
      state.phase = "waiting";
      main.replaceChildren(notice(t("wait.title"), t("wait.text")));
      byId("main").querySelector("section")?.setAttribute("role", "status");
      return;
    }
    state.waiting.set(participant.participant_id, participant);
    say(t("wait.arrived", { name: participant.name }));
    renderPeople();
  });
  sig.on("joined", (snapshot) => entered(snapshot));
  sig.on("participant_joined", (p) => {
    state.participants.set(p.participant_id, p);
    state.waiting.delete(p.participant_id);
    renderPeople();
    syncTracks();
  });
  sig.on("participant_left", ({ participant, reason }) => {
    const p = state.participants.get(participant) ?? state.waiting.get(participant);
    state.participants.delete(participant);
    state.waiting.delete(participant);
    if (p) say(t("room.left", { name: p.name, reason: t(`reason.${reason}`) }));
    renderPeople();
    syncTracks();
  });
  sig.on("admitted", ({ participant }) => { state.waiting.delete(participant); renderPeople(); });
  sig.on("denied", ({ participant, reason }) => {
    if (state.phase === "waiting" || state.phase === "prejoin") {
      showNotice(t("wait.deniedTitle"), reason ? t("wait.deniedReason", { reason }) : t("wait.denied"));
      return;
    }
    state.waiting.delete(participant);
    renderPeople();
  });
  sig.on("chat_message", (m) => { state.chat.push(m); renderChat(); });
  sig.on("trainee_chat_set", ({ open }) => { state.traineeChat = open; renderChat(); });
  sig.on("hand_raised", ({ participant }) => setFlag(participant, "hand_raised", true));
  sig.on("hand_lowered", ({ participant }) => setFlag(participant, "hand_lowered", false));
  sig.on("muted", ({ participant, kind }) => {
    setFlag(participant, kind === "audio" ? "audio_muted" : "video_muted", true);
    if (participant === state.me?.participant_id) say(t(kind === "audio" ? "room.youAudioMuted" : "room.youVideoMuted"));
  });
  sig.on("removed", ({ participant, reason }) => {
    if (participant === state.me?.participant_id) {
      showNotice(t("room.removedTitle"), t("room.removed", { reason }));
    }
  });
  sig.on("consent_recorded", (c) => {
    state.consents.push(c);
    say(t("consent.recorded", { kind: t(`consent.${c.kind}`), value: t(c.granted ? "consent.given" : "consent.withdrawn") }));
    renderPeople();
  });
  sig.on("annotation", (a) => {
    const list = state.strokes.get(a.target_track) ?? [];
    if (a.clear) list.length = 0;
    else list.push({ points: a.points, colour: a.colour, width: a.width });
    state.strokes.set(a.target_track, list);
    drawStrokes();
  });
  sig.on("recording_started", (r) => { state.recording = { by: r.by, at: r.at }; say(t("room.recordingOn")); renderRecording(); });
  sig.on("recording_stopped", (r) => {
    state.recording = null;
    say(t(`rec.stopped.${r.reason}`));
    renderRecording();
  });
  sig.on("track_published", (tr) => {
    if (tr.participant === state.me?.participant_id && tr.source === "camera") {
      state.ownCameraTrack = tr.track_id;
      const tile = state.tiles.get(`${tr.participant}:camera`);
      if (tile) tile.trackId = tr.track_id;
    }
  });
  sig.on("layer_changed", (l) => say(t("room.layerChanged", { layer: t(`layer.${l.layer}`) })));
  sig.on("session_ended", ({ reason }) => {
    showNotice(t("room.endedTitle"), reason === "ended" ? t("room.ended") : t("room.endedEmpty"), true);
    sig.close();
  });
  sig.on("error", (e) => {
    if (e.code === "token_expired") showNotice(t("err.linkTitle"), t("err.expired"));
  });
  sig.on("_disconnected", ({ willRetry }) => {
    if (state.phase !== "room" && state.phase !== "waiting") return;
    if (willRetry) { state.phase = state.phase === "room" ? "room" : state.phase; byId("reconnecting").hidden = false; say(t("room.reconnecting")); }
  });
  sig.on("_connect_error", ({ message, willRetry }) => {
    if (!willRetry && state.phase !== "start") showNotice(t("err.linkTitle"), connectRefusal(message));
  });
  sig.on("_rejoin_failed", (err) => showNotice(t("err.joinTitle"), errorText(err), true));
}

function setFlag(/** @type {string} */ pid, /** @type {string} */ flag, /** @type {boolean} */ value) {
  const p = state.participants.get(pid);
  if (!p) return;
  if (flag === "hand_lowered") p.hand_raised = false;
  else /** @type {any} */ (p)[flag] = value;
  if (flag.startsWith("hand") && value) say(t("room.handRaised", { name: p.name }));
  renderPeople();
  renderToolbar();
}

/** A `joined` snapshot: the first entry, an admission, or a seat resumed after a reconnect. */
async function entered(/** @type {any} */ snapshot) {
  state.me = snapshot.you;
  state.kind = snapshot.kind;
  state.participants = new Map(snapshot.participants.map((/** @type {Participant} */ p) => [p.participant_id, p]));
  state.waiting = new Map(snapshot.waiting.map((/** @type {Participant} */ p) => [p.participant_id, p]));
  state.chat = snapshot.chat;
  state.consents = snapshot.consents;
  state.traineeChat = snapshot.trainee_chat;
  state.recording = snapshot.recording ?? null;
  state.iceServers = snapshot.ice_servers ?? [];
  // Fresh TURN credentials: an ICE restart on a kept connection allocates with them.
  subscriber?.setIceServers(state.iceServers);
  publisher?.setIceServers(state.iceServers);
  const firstTime = state.phase !== "room";
  state.phase = "room";
  const banner = document.getElementById("reconnecting");
  if (banner) banner.hidden = true;
  if (firstTime) {
    buildRoom();
    startStats();
  } else {
    say(t("room.reconnected"));
  }
  renderAll();
  if (!firstTime && snapshot.media_kept && (publisher || !mayPublish())) {
    // The seat came back with its media connections (a new socket, same page): the network
    // may have changed under them, so ICE restarts on both.
    restartMedia();
    return;
  }
  // Otherwise the seat's media connections on the server are fresh (first entry, a seat
  // resumed without them, a new seat): our tracks are published again, and the subscribe
  // connection follows the server's next offer.
  publisher?.close();
  publisher = null;
  state.ownCameraTrack = null;
  // The server keeps a video quality chosen without a track for the seat's media connections,
  // so fresh ones are told again.
  if (state.layer !== "auto" && can("subscribe")) act("set_layer", { layer: state.layer });
  await publishAll();
  if (firstTime && (who?.role === "resident" || who?.role === "guardian") && !consentGiven("consultation")) {
    openConsent();
  }
}

async function publishAll() {
  if (!mayPublish()) return;
  publisher = new Publisher(sig, state.iceServers);
  watchMedia(publisher.pc);
  /** @type {[import("../lib/peers.js").Source, MediaStreamTrack][]} */
  const pairs = [];
  if (state.camera && state.camOn) pairs.push(["camera", state.camera]);
  if (state.microphone) pairs.push(["microphone", state.microphone]);
  try {
    await publisher.sendAll(pairs);
  } catch (err) {
    say(t("room.publishFailed", { reason: errorText(err) }));
  }
}

// --- the room's layout -------------------------------------------------------------------------

function buildRoom() {
  main.replaceChildren(
    h("div", { id: "reconnecting", class: "banner", role: "status", hidden: true, text: t("room.reconnecting") }),
    h("div", { id: "media-reconnecting", class: "banner", role: "status", hidden: true, text: t("room.mediaReconnecting") }),
    h("div", { class: "room" },
      h("section", { class: "stage", "aria-label": t("room.videos") },
        h("div", { id: "grid", class: "grid" }),
        h("div", { id: "toolbar", class: "toolbar", role: "toolbar", "aria-label": t("room.controls") })),
      h("aside", { class: "side" },
        h("section", { id: "people", "aria-labelledby": "people-title" }),
        h("section", { id: "chat", "aria-labelledby": "chat-title" }))),
    h("div", { id: "audios", hidden: true }),
    h("dialog", { id: "dialog", "aria-modal": "true" }),
  );
  rerenderPage = renderAll;
}

function renderAll() {
  pageHeader();
  const banner = document.getElementById("reconnecting");
  if (banner) banner.textContent = t("room.reconnecting");
  const mediaBanner = document.getElementById("media-reconnecting");
  if (mediaBanner) mediaBanner.textContent = t("room.mediaReconnecting");
  document.querySelector(".stage")?.setAttribute("aria-label", t("room.videos"));
  renderToolbar();
  renderPeople();
  renderChat();
  syncTracks();
  for (const tile of state.tiles.values()) labelTile(tile);
}

function renderRecording() {
  pageHeader();
  renderToolbar();
}

function consentGiven(/** @type {string} */ kind) {
  const last = [...state.consents].reverse().find((c) => c.kind === kind);
  return !!last?.granted;
}

function toggle(/** @type {string} */ id, /** @type {string} */ label, /** @type {boolean} */ pressed, /** @type {() => void} */ onclick) {
  return h("button", { id, "aria-pressed": String(pressed), class: pressed ? "on" : "", text: label, onclick });
}

function renderToolbar() {
  const bar = document.getElementById("toolbar");
  if (!bar) return;
  const items = [];
  if (can("publish_audio") && state.microphone) {
    items.push(toggle("mic", state.micOn ? t("tb.mute") : t("tb.unmute"), !state.micOn, () => {
      state.micOn = !state.micOn;
      if (state.microphone) state.microphone.enabled = state.micOn;
      renderToolbar();
    }));
  }
  if (can("publish_video")) {
    items.push(toggle("cam", state.camOn ? t("tb.camOff") : t("tb.camOn"), !state.camOn, () => toggleCamera()));
    items.push(toggle("second", state.second ? t("tb.secondOff") : t("tb.secondOn"), !!state.second, () => toggleSecond()));
  }
  if (can("publish_screen") && navigator.mediaDevices.getDisplayMedia) {
    items.push(toggle("screen", state.screen ? t("tb.screenOff") : t("tb.screenOn"), !!state.screen, () => toggleScreen()));
  }
  const mine = state.me ? state.participants.get(state.me.participant_id) : null;
  items.push(toggle("hand", mine?.hand_raised ? t("tb.lowerHand") : t("tb.raiseHand"), !!mine?.hand_raised,
    () => act(mine?.hand_raised ? "lower_hand" : "raise_hand")));
  if (can("annotate")) {
    items.push(toggle("draw", t("tb.draw"), state.drawing, () => {
      state.drawing = !state.drawing;
      document.getElementById("grid")?.classList.toggle("drawing", state.drawing);
      say(state.drawing ? t("tb.drawHelp") : t("tb.drawOff"));
      renderToolbar();
    }));
  }
  if (can("consent")) items.push(h("button", { id: "consent-open", text: t("tb.consent"), onclick: openConsent }));
  if (can("start_recording")) {
    items.push(toggle("record", state.recording ? t("tb.stopRec") : t("tb.startRec"), !!state.recording, async () => {
      const ok = await act(state.recording ? "stop_recording" : "start_recording");
      if (ok === null && !state.recording && !consentGiven("recording")) say(t("code.consent_missing"));
    }));
  }
  if (can("subscribe")) {
    const layer = h("select", { id: "layer", "aria-label": t("tb.layer"), onchange: (/** @type {Event} */ e) => {
      state.layer = /** @type {HTMLSelectElement} */ (e.target).value;
      act("set_layer", { layer: state.layer });
    } }, ...["auto", "full", "low", "audio_only"].map((l) => h("option", { value: l, text: t(`layer.${l}`), selected: l === state.layer })));
    items.push(h("label", { class: "layer" }, h("span", { text: t("tb.layer") }), layer));
  }
  items.push(h("button", { id: "leave", text: t("tb.leave"), onclick: async () => {
    try { await sig.leave(); } catch (err) { say(errorText(err)); }
    showNotice(t("room.leftTitle"), t("room.youLeft"), true);
    sig.close();
  } }));
  if (can("end_session")) {
    items.push(h("button", { id: "end", class: "danger", text: t("tb.end"), onclick: () => confirmDialog(t("tb.endConfirm"), () => act("end_session")) }));
  }
  bar.replaceChildren(...items);
}

async function toggleCamera() {
  if (!publisher) return;
  state.camOn = !state.camOn;
  if (state.camOn) {
    state.camera = await openCamera(state.cameraId);
    await publisher.send("camera", state.camera);
  } else {
    await publisher.send("camera", null);
    state.camera?.stop();
  }
  syncTracks();
  renderToolbar();
}

async function toggleScreen() {
  if (!publisher) return;
  if (state.screen) {
    state.screen.stop();
    state.screen = null;
    await publisher.send("screen", null);
  } else {
    try {
      const stream = await navigator.mediaDevices.getDisplayMedia({ video: true });
      state.screen = stream.getVideoTracks()[0];
      state.screen.addEventListener("ended", () => { if (state.screen) toggleScreen(); });
      await publisher.send("screen", state.screen);
    } catch (err) {
      say(errorText(err));
    }
  }
  syncTracks();
  renderToolbar();
}

async function toggleSecond() {
  if (!publisher) return;
  if (state.second) {
    state.second.stop();
    state.second = null;
    await publisher.send("field_camera", null);
    syncTracks();
    renderToolbar();
    return;
  }
  const { cameras } = await listDevices();
  const select = h("select", { id: "second-select" }, ...cameras.map((d, i) => h("option", { value: d.deviceId, text: d.label || `${t("pre.camera")} ${i + 1}` })));
  openDialog(t("tb.secondTitle"), [h("label", { for: "second-select", text: t("pre.camera") }), select], async () => {
    try {
      state.second = await openCamera(/** @type {HTMLSelectElement} */ (select).value);
      await publisher?.send("field_camera", state.second);
    } catch (err) {
      say(errorText(err));
    }
    syncTracks();
    renderToolbar();
  });
}

// --- dialogs -----------------------------------------------------------------------------------

/** @param {string} title @param {Node[]} fields @param {() => void | Promise<void>} onOk */
function openDialog(title, fields, onOk, okLabel = t("ok")) {
  const dialog = /** @type {HTMLDialogElement} */ (byId("dialog"));
  const form = h("form", { method: "dialog" },
    h("h2", { id: "dialog-title", text: title }), ...fields,
    h("div", { class: "actions" },
      h("button", { value: "cancel", type: "submit", formnovalidate: true, text: t("cancel") }),
      h("button", { value: "ok", type: "submit", class: "primary", id: "dialog-ok", text: okLabel })));
  dialog.setAttribute("aria-labelledby", "dialog-title");
  dialog.replaceChildren(form);
  dialog.onclose = () => { if (dialog.returnValue === "ok") onOk(); };
  dialog.returnValue = "";
  dialog.showModal();
}

function confirmDialog(/** @type {string} */ text, /** @type {() => void} */ onOk) {
  openDialog(text, [], onOk);
}

/** The consent dialog: consultation, recording and teaching use are separate consents. */
function openConsent() {
  const kinds = ["consultation", "recording", "teaching"];
  const boxes = kinds.map((kind) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: kind, id: `consent-${kind}`, checked: consentGiven(kind) }),
    h("span", { text: t(`consent.ask.${kind}`) })));
  openDialog(t("consent.title"), [h("p", { text: t("consent.intro") }), ...boxes], async () => {
    for (const kind of kinds) {
      const box = /** @type {HTMLInputElement} */ (byId(`consent-${kind}`));
      const granted = box.checked;
      const last = [...state.consents].reverse().find((c) => c.kind === kind);
      // Only changes are sent: each is an entry in the record.
      if (last ? last.granted !== granted : granted) await act("consent", { kind, granted });
    }
  }, t("consent.save"));
}

// --- participants, waiting room, chat ----------------------------------------------------------

function renderPeople() {
  const box = document.getElementById("people");
  if (!box) return;
  const items = [];
  if (can("admit") && state.waiting.size) {
    items.push(h("h3", { text: t("people.waiting", { n: state.waiting.size }) }));
    items.push(h("ul", { class: "waiting" }, ...[...state.waiting.values()].map((p) => h("li", { "data-participant": p.participant_id },
      h("span", { text: `${p.name} · ${roleName(p.role)} · ${p.org}` }),
      h("button", { class: "primary", text: t("people.admit"), "aria-label": t("people.admitWho", { name: p.name }),
        onclick: () => act("admit", { participant: p.participant_id }) }),
      h("button", { text: t("people.deny"), "aria-label": t("people.denyWho", { name: p.name }),
        onclick: () => reasonDialog(t("people.denyWho", { name: p.name }), false, (reason) => act("deny", { participant: p.participant_id, reason })) })))));
  }
  const list = [...state.participants.values()].map((p) => {
    // The recorder is a seat that sends nothing: its mute flags and empty institution mean nothing.
    const recorder = p.role === "recorder";
    const flags = recorder ? "" : [p.hand_raised ? "✋" : "", p.audio_muted ? t("people.audioMuted") : "", p.video_muted ? t("people.videoMuted") : "", p.connected ? "" : t("people.away")].filter(Boolean).join(" ");
    const actions = [];
    const mine = p.participant_id === state.me?.participant_id;
    if (!mine && p.role !== "recorder" && can("mute_others")) {
      if (!p.audio_muted) actions.push(h("button", { text: t("people.muteAudio"), "aria-label": t("people.muteAudioWho", { name: p.name }), onclick: () => act("mute", { participant: p.participant_id, kind: "audio" }) }));
      if (!p.video_muted) actions.push(h("button", { text: t("people.muteVideo"), "aria-label": t("people.muteVideoWho", { name: p.name }), onclick: () => act("mute", { participant: p.participant_id, kind: "video" }) }));
    }
    if (!mine && p.role !== "recorder" && can("remove_participant") && p.user_id !== who?.sub) {
      actions.push(h("button", { class: "danger", text: t("people.remove"), "aria-label": t("people.removeWho", { name: p.name }),
        onclick: () => reasonDialog(t("people.removeWho", { name: p.name }), true, (reason) => act("remove", { participant: p.participant_id, reason })) }));
    }
    return h("li", { "data-participant": p.participant_id },
      h("span", { class: recorder ? "person rec-person" : "person", text: recorder ? `● ${p.name}` : `${p.name}${mine ? ` (${t("people.you")})` : ""} · ${roleName(p.role)} · ${p.org}` }),
      flags ? h("span", { class: "flags", text: flags }) : null,
      actions.length ? h("span", { class: "actions" }, ...actions) : null);
  });
  items.push(h("h3", { text: t("people.inRoom", { n: state.participants.size }) }), h("ul", { class: "participants" }, ...list));
  const consents = ["consultation", "recording", "teaching"].map((k) => `${t(`consent.${k}`)}: ${t(consentGiven(k) ? "yes" : "no")}`).join(" · ");
  items.push(h("p", { class: "consents", id: "consent-state", text: `${t("consent.state")} ${consents}` }));
  box.replaceChildren(h("h2", { id: "people-title", text: t("people.title") }), ...items);
}

function reasonDialog(/** @type {string} */ title, /** @type {boolean} */ required, /** @type {(r: string) => void} */ onOk) {
  const input = h("input", { id: "reason", type: "text", maxlength: "500", required });
  openDialog(title, [h("label", { for: "reason", text: t("people.reason") }), input], () => onOk(/** @type {HTMLInputElement} */ (input).value.trim()));
}

function renderChat() {
  const box = document.getElementById("chat");
  if (!box) return;
  const closed = who?.role === "trainee" && !state.traineeChat;
  const log = h("ol", { class: "chat-log", id: "chat-log", "aria-live": "polite" },
    ...state.chat.map((m) => h("li", {},
      h("span", { class: "chat-who", text: `${m.name} (${roleName(m.role)}) ${when(m.at)}` }),
      h("p", { class: "chat-text", text: m.text }))));
  const input = h("input", { id: "chat-input", type: "text", maxlength: "2000", autocomplete: "off", disabled: closed || !can("chat") });
  const form = h("form", { class: "chat-form", onsubmit: async (/** @type {Event} */ e) => {
    e.preventDefault();
    const text = /** @type {HTMLInputElement} */ (input).value.trim();
    if (!text) return;
    // Cleared first: the message's own announcement redraws the chat before the ack comes.
    /** @type {HTMLInputElement} */ (input).value = "";
    const sent = await act("chat", { text });
    const current = /** @type {HTMLInputElement | null} */ (document.getElementById("chat-input"));
    if (!sent && current && !current.value) current.value = text;
    current?.focus();
  } }, h("label", { for: "chat-input", class: "sr-only", text: t("chat.message") }), input,
    h("button", { type: "submit", text: t("chat.send"), disabled: closed || !can("chat") }));
  const items = [h("h2", { id: "chat-title", text: t("chat.title") }), log];
  if (closed) items.push(h("p", { class: "hint", text: t("chat.closed") }));
  if (can("admit") && state.kind === "teaching") {
    items.push(h("label", { class: "check" }, h("input", { type: "checkbox", id: "trainee-chat", checked: state.traineeChat,
      onchange: (/** @type {Event} */ e) => act("set_trainee_chat", { open: /** @type {HTMLInputElement} */ (e.target).checked }) }),
      h("span", { text: t("chat.traineeChat") })));
  }
  if (can("chat")) items.push(form);
  const hadFocus = document.activeElement?.id === "chat-input";
  const draft = /** @type {HTMLInputElement | null} */ (document.getElementById("chat-input"))?.value ?? "";
  box.replaceChildren(...items);
  /** @type {HTMLInputElement} */ (input).value = draft;
  if (hadFocus) /** @type {HTMLInputElement} */ (input).focus();
  log.scrollTop = log.scrollHeight;
}

// --- video tiles, audio, annotations -----------------------------------------------------------

function participantFor(/** @type {string} */ pid) {
  return state.participants.get(pid);
}

function labelTile(/** @type {Tile} */ tile) {
  const p = participantFor(tile.participant);
  const source = tile.source === "camera" ? "" : ` — ${t(`source.${tile.source}`)}`;
  const mine = tile.participant === state.me?.participant_id ? ` (${t("people.you")})` : "";
  const text = p ? `${p.name}${mine} · ${roleName(p.role)} · ${p.org}${source}` : source;
  tile.label.textContent = text;
  tile.el.setAttribute("aria-label", text);
}

function tileFor(/** @type {string} */ pid, /** @type {string} */ source) {
  const key = `${pid}:${source}`;
  let tile = state.tiles.get(key);
  if (tile) return tile;
  const video = /** @type {HTMLVideoElement} */ (h("video", { autoplay: true, playsinline: true, muted: true }));
  const canvas = /** @type {HTMLCanvasElement} */ (h("canvas", { class: "ink", "aria-hidden": "true" }));
  const label = h("span", { class: "label" });
  const clear = h("button", { class: "clear", text: t("tile.clear"), hidden: true, onclick: () => {
    if (tile?.trackId) act("annotate", { target_track: tile.trackId, points: [], clear: true });
  } });
  const el = h("figure", { class: "tile", "data-participant": pid, "data-source": source, role: "group" },
    video, canvas, h("figcaption", {}, label, clear));
  tile = { el, video, canvas, label, participant: pid, source, frames: 0, still: 0 };
  state.tiles.set(key, tile);
  labelTile(tile);
  drawing(tile);
  byId("grid").append(el);
  return tile;
}

function mayHaveCamera(/** @type {Participant} */ p) {
  return !["trainee", "coordinator", "recorder"].includes(p.role);
}

/** Tiles and audio elements follow the participants and what the subscribe connection carries. */
function syncTracks() {
  if (state.phase !== "room" || !document.getElementById("grid")) return;
  /** @type {Set<string>} */
  const wanted = new Set();
  const me = state.me?.participant_id;
  for (const p of state.participants.values()) {
    if (mayHaveCamera(p) && (p.participant_id !== me || can("publish_video"))) wanted.add(`${p.participant_id}:camera`);
  }
  if (me && state.second) wanted.add(`${me}:field_camera`);
  if (me && state.screen) wanted.add(`${me}:screen`);
  const audioWanted = new Set();
  for (const r of state.received) {
    if (!state.participants.has(r.info.participant)) continue;
    if (r.info.kind === "video") {
      const key = `${r.info.participant}:${r.info.source}`;
      wanted.add(key);
      const tile = tileFor(r.info.participant, r.info.source);
      tile.trackId = r.info.track_id;
      const current = /** @type {MediaStream | null} */ (tile.video.srcObject);
      if (current?.getVideoTracks()[0] !== r.track) tile.video.srcObject = new MediaStream([r.track]);
    } else {
      audioWanted.add(r.info.track_id);
      let audio = state.audios.get(r.info.track_id);
      if (!audio) {
        audio = /** @type {HTMLAudioElement} */ (h("audio", { autoplay: true, "data-track": r.info.track_id }));
        state.audios.set(r.info.track_id, audio);
        byId("audios").append(audio);
      }
      const current = /** @type {MediaStream | null} */ (audio.srcObject);
      if (current?.getAudioTracks()[0] !== r.track) audio.srcObject = new MediaStream([r.track]);
    }
  }
  // Our own pictures, shown from the local tracks (muted: we never hear ourselves).
  if (me) {
    /** @type {[string, MediaStreamTrack | null, string | null][]} */
    const own = [["camera", state.camOn ? state.camera : null, state.ownCameraTrack], ["field_camera", state.second, null], ["screen", state.screen, null]];
    for (const [source, track] of own) {
      if (!wanted.has(`${me}:${source}`)) continue;
      const tile = tileFor(me, source);
      tile.el.classList.add("mine");
      if (source === "camera") tile.trackId = state.ownCameraTrack ?? undefined;
      const current = /** @type {MediaStream | null} */ (tile.video.srcObject);
      if (track && current?.getVideoTracks()[0] !== track) tile.video.srcObject = new MediaStream([track]);
      if (!track) tile.video.srcObject = null;
    }
  }
  for (const [key, tile] of state.tiles) {
    if (!wanted.has(key)) { tile.el.remove(); state.tiles.delete(key); } else labelTile(tile);
  }
  for (const [id, audio] of state.audios) {
    if (!audioWanted.has(id)) { audio.remove(); state.audios.delete(id); }
  }
  byId("grid").dataset.count = String(state.tiles.size);
  drawStrokes();
}

/** Where the picture is inside its element (object-fit: contain letterboxes it). */
function pictureBox(/** @type {HTMLVideoElement} */ video) {
  const w = video.clientWidth;
  const hgt = video.clientHeight;
  const vw = video.videoWidth || 4;
  const vh = video.videoHeight || 3;
  const scale = Math.min(w / vw, hgt / vh);
  return { x: (w - vw * scale) / 2, y: (hgt - vh * scale) / 2, w: vw * scale, h: vh * scale };
}

function drawStrokes() {
  for (const tile of state.tiles.values()) {
    const { canvas, video } = tile;
    canvas.width = video.clientWidth;
    canvas.height = video.clientHeight;
    const g = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d"));
    g.clearRect(0, 0, canvas.width, canvas.height);
    const strokes = tile.trackId ? state.strokes.get(tile.trackId) ?? [] : [];
    const clear = /** @type {HTMLElement} */ (tile.el.querySelector(".clear"));
    clear.hidden = !(strokes.length && can("annotate"));
    tile.el.dataset.strokes = String(strokes.length);
    const box = pictureBox(video);
    for (const s of strokes) {
      g.strokeStyle = s.colour;
      g.lineWidth = s.width;
      g.lineCap = "round";
      g.lineJoin = "round";
      g.beginPath();
      s.points.forEach(([x, y], i) => {
        const px = box.x + x * box.w;
        const py = box.y + y * box.h;
        if (i === 0) g.moveTo(px, py); else g.lineTo(px, py);
      });
      if (s.points.length === 1) g.lineTo(box.x + s.points[0][0] * box.w + 0.1, box.y + s.points[0][1] * box.h);
      g.stroke();
    }
  }
}
window.addEventListener("resize", () => drawStrokes());

/** Drawing on a tile while the draw tool is on: one stroke per press, sent when released. */
function drawing(/** @type {Tile} */ tile) {
  /** @type {number[][] | null} */
  let points = null;
  const at = (/** @type {PointerEvent} */ e) => {
    const rect = tile.canvas.getBoundingClientRect();
    const box = pictureBox(tile.video);
    const x = (e.clientX - rect.left - box.x) / box.w;
    const y = (e.clientY - rect.top - box.y) / box.h;
    return [Math.min(1, Math.max(0, x)), Math.min(1, Math.max(0, y))];
  };
  tile.canvas.addEventListener("pointerdown", (e) => {
    if (!state.drawing || !tile.trackId) return;
    tile.canvas.setPointerCapture(e.pointerId);
    points = [at(e)];
  });
  tile.canvas.addEventListener("pointermove", (e) => {
    if (!points || points.length >= 500) return;
    points.push(at(e));
    const g = /** @type {CanvasRenderingContext2D} */ (tile.canvas.getContext("2d"));
    const box = pictureBox(tile.video);
    const [a, b] = points.slice(-2);
    g.strokeStyle = "#ff3b30";
    g.lineWidth = 4;
    g.beginPath();
    g.moveTo(box.x + a[0] * box.w, box.y + a[1] * box.h);
    g.lineTo(box.x + b[0] * box.w, box.y + b[1] * box.h);
    g.stroke();
  });
  tile.canvas.addEventListener("pointerup", () => {
    if (!points || !tile.trackId) return;
    const stroke = points.map(([x, y]) => [Math.round(x * 1e4) / 1e4, Math.round(y * 1e4) / 1e4]);
    points = null;
    act("annotate", { target_track: tile.trackId, points: stroke, colour: "#ff3b30", width: 4 });
  });
}

// --- statistics: active speaker, stalled pictures, quality -------------------------------------

function startStats() {
  /** @type {Map<string, import("../lib/stats.js").TrackStats>} */
  let before = new Map();
  const tick = async () => {
    if (state.phase !== "room" && state.phase !== "over") return;
    if (state.phase === "over") return;
    try {
      const now = subscriber ? await inbound(subscriber) : new Map();
      /** @type {[string, number]} */
      let loudest = ["", 0.03];
      for (const s of now.values()) {
        if (s.info.kind === "audio" && s.audioLevel > loudest[1]) loudest = [s.info.participant, s.audioLevel];
        if (s.info.kind === "video") {
          const tile = state.tiles.get(`${s.info.participant}:${s.info.source}`);
          if (tile) {
            tile.still = s.framesDecoded === tile.frames ? tile.still + 1 : 0;
            tile.frames = s.framesDecoded;
            tile.el.classList.toggle("stalled", tile.still >= 3);
          }
        }
      }
      if (publisher && state.micOn) {
        const mine = await ownAudioLevel(publisher.pc);
        if (mine > loudest[1] && state.me) loudest = [state.me.participant_id, mine];
      }
      for (const tile of state.tiles.values()) tile.el.classList.toggle("speaking", tile.source === "camera" && tile.participant === loudest[0]);
      const pc = subscriber?.received().length ? subscriber.pc : publisher?.pc;
      const rtt = pc ? await roundTrip(pc) : null;
      const quality = grade(before, now, rtt);
      before = now;
      if (quality !== state.quality) { state.quality = quality; pageHeader(); }
    } catch (err) {
      console.warn("stats", err);
    }
    setTimeout(tick, 1000);
  };
  tick();
}

function stopMedia() {
  for (const track of [state.camera, state.microphone, state.screen, state.second]) track?.stop();
  publisher?.close();
  subscriber?.close();
  publisher = null;
  subscriber = null;
}

// For tests and support: what this page receives, in plain numbers.
/** @type {any} */ (window).telemedDebug = {
  participantId: () => state.me?.participant_id ?? null,
  phase: () => state.phase,
  /** The two peer connections, for tests that read their raw getStats(). */
  connections: () => ({ publish: publisher?.pc ?? null, subscribe: subscriber?.pc ?? null }),
  /** Which section of the subscribe connection carries whose track now (sections are reused). */
  sections: () => (subscriber ? subscriber.received().map((r) => ({ mid: r.mid, participant: r.info.participant })) : []),
  inbound: async () => (subscriber ? [...(await inbound(subscriber)).values()] : []),
  outbound: async () => {
    /** @type {any[]} */
    const out = [];
    (await publisher?.pc.getStats())?.forEach((/** @type {any} */ s) => { if (s.type === "outbound-rtp") out.push({ kind: s.kind, framesEncoded: s.framesEncoded, packetsSent: s.packetsSent, bytesSent: s.bytesSent, qualityLimitationReason: s.qualityLimitationReason }); });
    return out;
  },
  publishing: () => (publisher ? publisher.pc.getSenders().filter((s) => s.track).map((s) => s.track?.kind) : []),
  /** A publish through the lib whatever the controls show (the server decides); the error code or "ok". */
  tryPublish: async () => {
    const canvas = document.createElement("canvas");
    canvas.getContext("2d")?.fillRect(0, 0, canvas.width, canvas.height);
    const track = canvas.captureStream(5).getVideoTracks()[0];
    const attempt = new Publisher(sig);
    try {
      await attempt.sendAll([["camera", track]]);
      return "ok";
    } catch (err) {
      return err instanceof SignalError ? err.code : String(err);
    } finally {
      attempt.close();
      track.stop();
    }
  },
  /** The local UDP ports our peer connections use now (their selected candidate pairs). */
  mediaPorts: async () => {
    /** @type {number[]} */
    const ports = [];
    for (const pc of [publisher?.pc, subscriber?.pc]) {
      if (!pc) continue;
      const report = await pc.getStats();
      report.forEach((/** @type {any} */ s) => {
        if (s.type !== "transport" || !s.selectedCandidatePairId) return;
        const pair = report.get(s.selectedCandidatePairId);
        const local = pair && report.get(pair.localCandidateId);
        if (local?.port) ports.push(local.port);
      });
    }
    return ports;
  },
  reconnecting: () => !byId("reconnecting")?.hidden,
  mediaReconnecting: () => !byId("media-reconnecting")?.hidden,
  /** How many of each server event this page heard. */
  heard: () => Object.fromEntries(sig.heard),
  /** ICE restarts this page has sent (both connections at once count one). */
  iceRestarts: () => media.restarts,
  /** Each connection's ICE state and the ICE ufrag its newest local description carries. */
  ice: () => Object.fromEntries(Object.entries({ publish: publisher?.pc, subscribe: subscriber?.pc }).map(([k, pc]) => [k, pc ? {
    state: pc.iceConnectionState, ufrag: pc.localDescription?.sdp.match(/a=ice-ufrag:(\S+)/)?.[1] ?? null } : null])),
};

// The browser knows the network went away, or changed, before the heartbeat does.
window.addEventListener("offline", () => { if (state.phase === "room" || state.phase === "waiting") sig.reconnectNow(); });
window.addEventListener("online", () => networkChanged());
/** @type {any} */ (navigator).connection?.addEventListener?.("change", () => networkChanged());

applyStatic(document);
start();
