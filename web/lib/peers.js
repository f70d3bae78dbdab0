// The two peer connections of docs/protocol.md's Media section: the client offers its tracks on
// the publish connection; the server offers everyone else's on the subscribe connection.
// Non-trickle ICE on both: every offer and answer carries all candidates.

/**
 * @typedef {"camera" | "microphone" | "screen" | "field_camera"} Source
 * @typedef {{track_id: string, participant: string, kind: "audio" | "video", source: Source}} TrackInfo
 * @typedef {{mid: string, info: TrackInfo, track: MediaStreamTrack}} Received
 * @typedef {import("./signaling.js").Signaling} Signaling
 */

/**
 * Resolves once ICE gathering has finished for the description just set (no trickle: the
 * offer or answer sent carries every candidate). After an ICE restart the state may still read
 * "complete" from the gathering before: then it waits for the new gathering to start and end.
 * Gives up after `timeoutMs` (no network: the description goes without candidates).
 * @param {RTCPeerConnection} pc @param {boolean} [restarted]
 */
function gathered(pc, restarted = false, timeoutMs = 10000) {
  return new Promise((resolve) => {
    let started = !restarted || pc.iceGatheringState === "gathering";
    const finish = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve(undefined);
    };
    const check = () => {
      if (pc.iceGatheringState === "gathering") started = true;
      if (started && pc.iceGatheringState === "complete") finish();
    };
    const timer = setTimeout(finish, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
    check();
  });
}

/** The ICE username fragment of a description (its first). @param {string | undefined} sdp */
function iceUfrag(sdp) {
  return sdp?.match(/a=ice-ufrag:(\S+)/)?.[1] ?? null;
}

/** Runs async steps one after another: one offer at a time per connection. */
class Queue {
  constructor() { /** @type {Promise<unknown>} */ this.tail = Promise.resolve(); }
  /** @template T @param {() => Promise<T>} step @returns {Promise<T>} */
  run(step) {
    const result = this.tail.then(step);
    this.tail = result.catch(() => undefined);
    return result;
  }
}

/** The relay forwards VP8 and Opus unchanged: put them first so nothing else is chosen. */
function preferCodecs(/** @type {RTCRtpTransceiver} */ transceiver, /** @type {string} */ kind) {
  const caps = RTCRtpSender.getCapabilities?.(kind);
  if (!caps || !transceiver.setCodecPreferences) return;
  const wanted = kind === "video" ? "video/vp8" : "audio/opus";
  const codecs = caps.codecs.filter((c) => c.mimeType.toLowerCase() === wanted);
  if (codecs.length) transceiver.setCodecPreferences(codecs);
}

/** The certificate fingerprints of an SDP ("alg value"; a browser keeps only one of several). @param {string} sdp */
function fingerprints(sdp) {
  return new Set([...sdp.matchAll(/a=fingerprint:(\S+) (\S+)/gi)].map((m) => `${m[1].toLowerCase()} ${m[2].toUpperCase()}`));
}

/** Whether two descriptions come from the same certificate. @param {string} a @param {string} b */
function sameCertificate(a, b) {
  const theirs = fingerprints(b);
  return [...fingerprints(a)].some((f) => theirs.has(f));
}

export class Publisher {
  /** @param {Signaling} signaling @param {RTCIceServer[]} [iceServers] */
  constructor(signaling, iceServers = []) {
    this.signaling = signaling;
    this.pc = new RTCPeerConnection({ iceServers });
    /** @type {Map<Source, RTCRtpTransceiver>} */
    this.bySource = new Map();
    this.queue = new Queue();
  }

  /**
   * Sends `track` as `source`. A source sent before reuses its section (no renegotiation);
   * a new one adds a section and offers again, as the protocol says.
   * @param {Source} source @param {MediaStreamTrack | null} track
   */
  async send(source, track) {
    const existing = this.bySource.get(source);
    if (existing) {
      await existing.sender.replaceTrack(track);
      return;
    }
    if (!track) return;
    const transceiver = this.pc.addTransceiver(track, { direction: "sendonly" });
    preferCodecs(transceiver, track.kind);
    this.bySource.set(source, transceiver);
    await this.negotiate();
  }

  /** Sends several new sources in one offer (the first publish). @param {[Source, MediaStreamTrack][]} pairs */
  async sendAll(pairs) {
    for (const [source, track] of pairs) {
      const transceiver = this.pc.addTransceiver(track, { direction: "sendonly" });
      preferCodecs(transceiver, track.kind);
      this.bySource.set(source, transceiver);
    }
    if (pairs.length) await this.negotiate();
  }

  /**
   * Restarts ICE on this connection (docs/protocol.md, Connection changes): an offer with new
   * credentials and the candidates of the network the browser is on now; the tracks stay.
   * @param {number} [timeoutMs] how long to wait for the server's answer
   */
  restartIce(timeoutMs) {
    return this.negotiate({ iceRestart: true }, timeoutMs);
  }

  /** @param {RTCOfferOptions} [options] @param {number} [timeoutMs] */
  negotiate(options = {}, timeoutMs = undefined) {
    return this.queue.run(async () => {
      await this.pc.setLocalDescription(await this.pc.createOffer(options));
      await gathered(this.pc, !!options.iceRestart);
      // Every sending section, those of earlier offers too: the server refuses an offer
      // that leaves one unnamed (docs/protocol.md, publish_offer).
      /** @type {Record<string, Source>} */
      const tracks = {};
      for (const [source, t] of this.bySource) if (t.mid !== null) tracks[t.mid] = source;
      const answer = this.signaling.next("publish_answer");
      const sdp = /** @type {RTCSessionDescription} */ (this.pc.localDescription).sdp;
      await this.signaling.request("publish_offer", { sdp, tracks }, timeoutMs);
      const { sdp: answerSdp } = /** @type {{sdp: string}} */ (await answer);
      await this.pc.setRemoteDescription({ type: "answer", sdp: answerSdp });
    });
  }

  close() { this.pc.close(); }
}

export class Subscriber extends EventTarget {
  /** @param {Signaling} signaling @param {RTCIceServer[]} [iceServers] */
  constructor(signaling, iceServers = []) {
    super();
    this.signaling = signaling;
    this.iceServers = iceServers;
    this.pc = this.newConnection();
    this.queue = new Queue();
    /** @type {Record<string, TrackInfo>} mid -> what the newest offer put there */
    this.offered = {};
    this.off = signaling.on("subscribe_offer", (offer) => {
      this.queue.run(() => this.answer(offer)).catch((err) => console.error("subscribe answer failed", err));
    });
  }

  /** The ICE servers `joined` names; set before the first offer is answered. @param {RTCIceServer[]} iceServers */
  setIceServers(iceServers) {
    if (JSON.stringify(iceServers) === JSON.stringify(this.iceServers)) return;
    this.iceServers = iceServers;
    // Only the ICE servers change (other settings, e.g. certificates, may not be changed).
    const { certificates, ...rest } = this.pc.getConfiguration();
    this.pc.setConfiguration({ ...rest, iceServers });
  }

  newConnection() {
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    pc.addEventListener("connectionstatechange", () => this.dispatchEvent(new Event("connectionstatechange")));
    return pc;
  }

  /** @param {{sdp: string, tracks: Record<string, TrackInfo>}} offer */
  async answer(offer) {
    const current = this.pc.remoteDescription?.sdp;
    if (current && !sameCertificate(current, offer.sdp)) {
      // A new seat (after a reconnect grace ran out) brings a new server connection.
      this.pc.close();
      this.pc = this.newConnection();
    }
    // New ICE credentials in the offer: the server restarts ICE (we asked, restart_subscribe).
    const restarted = !!current && iceUfrag(current) !== iceUfrag(offer.sdp) && this.pc.remoteDescription !== null;
    await this.pc.setRemoteDescription({ type: "offer", sdp: offer.sdp });
    await this.pc.setLocalDescription(await this.pc.createAnswer());
    await gathered(this.pc, restarted);
    this.offered = offer.tracks;
    const sdp = /** @type {RTCSessionDescription} */ (this.pc.localDescription).sdp;
    await this.signaling.request("subscribe_answer", { sdp });
    this.dispatchEvent(new CustomEvent("tracks", { detail: this.received() }));
  }

  /**
   * Asks the server to restart ICE on this connection: its next offer does (answered as any
   * other), or, where its side is gone, a new connection comes. Resolves with the ack's result.
   * @param {number} [timeoutMs]
   */
  restart(timeoutMs) {
    return this.signaling.request("restart_subscribe", {}, timeoutMs);
  }

  /** What arrives now: the server reuses sections, so the mapping is read from the newest offer. @returns {Received[]} */
  received() {
    /** @type {Received[]} */
    const out = [];
    for (const t of this.pc.getTransceivers()) {
      const info = t.mid !== null ? this.offered[t.mid] : undefined;
      if (info && t.receiver.track) out.push({ mid: /** @type {string} */ (t.mid), info, track: t.receiver.track });
    }
    return out;
  }

  close() { this.off(); this.pc.close(); }
}
