// Statistics from getStats: per received track (frames decoded, loss, audio level), our own
// microphone level, and a connection quality from loss and round-trip time.

/**
 * @typedef {import("./peers.js").TrackInfo} TrackInfo
 * @typedef {{info: TrackInfo, framesDecoded: number, packetsReceived: number, packetsLost: number,
 *   bytesReceived: number, jitter: number, audioLevel: number, totalAudioEnergy: number,
 *   frameWidth: number, frameHeight: number}} TrackStats
 * @typedef {"good" | "fair" | "poor" | "unknown"} Quality
 */

/**
 * Inbound stats of the subscribe connection, by track id.
 * @param {import("./peers.js").Subscriber} subscriber
 * @returns {Promise<Map<string, TrackStats>>}
 */
export async function inbound(subscriber) {
  /** @type {Map<string, TrackStats>} */
  const out = new Map();
  const report = await subscriber.pc.getStats();
  const byMid = new Map(subscriber.received().map((r) => [r.mid, r]));
  const byTrackId = new Map(subscriber.received().map((r) => [r.track.id, r]));
  report.forEach((/** @type {any} */ s) => {
    if (s.type !== "inbound-rtp") return;
    const found = byMid.get(s.mid) ?? byTrackId.get(s.trackIdentifier);
    if (!found) return;
    out.set(found.info.track_id, {
      info: found.info,
      framesDecoded: s.framesDecoded ?? 0,
      packetsReceived: s.packetsReceived ?? 0,
      packetsLost: s.packetsLost ?? 0,
      bytesReceived: s.bytesReceived ?? 0,
      jitter: s.jitter ?? 0,
      audioLevel: s.audioLevel ?? 0,
      totalAudioEnergy: s.totalAudioEnergy ?? 0,
      frameWidth: s.frameWidth ?? 0,
      frameHeight: s.frameHeight ?? 0,
    });
  });
  return out;
}

/** Our microphone's level (0..1) from the publish connection's media-source stats. */
export async function ownAudioLevel(/** @type {RTCPeerConnection} */ pc) {
  let level = 0;
  (await pc.getStats()).forEach((/** @type {any} */ s) => {
    if (s.type === "media-source" && s.kind === "audio") level = s.audioLevel ?? 0;
  });
  return level;
}

/** Round-trip time (s) of the selected candidate pair, or null. */
export async function roundTrip(/** @type {RTCPeerConnection} */ pc) {
  /** @type {number | null} */
  let rtt = null;
  (await pc.getStats()).forEach((/** @type {any} */ s) => {
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined) {
      rtt = s.currentRoundTripTime;
    }
  });
  return rtt;
}

/** Loss over an interval, from two inbound snapshots, with the RTT: a three-step grade. */
export function grade(
  /** @type {Map<string, TrackStats>} */ before,
  /** @type {Map<string, TrackStats>} */ now,
  /** @type {number | null} */ rtt,
) {
  let received = 0;
  let lost = 0;
  for (const [id, s] of now) {
    const prev = before.get(id);
    if (!prev) continue;
    received += Math.max(0, s.packetsReceived - prev.packetsReceived);
    lost += Math.max(0, s.packetsLost - prev.packetsLost);
  }
  /** @type {Quality} */
  let quality = "unknown";
  if (received + lost > 0 || rtt !== null) {
    const loss = received + lost > 0 ? lost / (received + lost) : 0;
    const r = rtt ?? 0;
    quality = loss < 0.02 && r < 0.3 ? "good" : loss < 0.1 && r < 0.8 ? "fair" : "poor";
  }
  return quality;
}
