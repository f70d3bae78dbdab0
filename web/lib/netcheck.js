// The pre-join network check: how long the server takes to answer over HTTP, and whether this
// browser can gather an ICE candidate for media (no candidate: WebRTC is blocked or there is no
// usable network interface). It does not send media: the server offers no test endpoint.

/**
 * @typedef {{rttMs: number | null, candidates: number, types: string[]}} NetworkCheck
 */

/** Median of three timed requests of /healthz; null when the server does not answer. */
async function serverRoundTrip() {
  /** @type {number[]} */
  const times = [];
  for (let i = 0; i < 3; i++) {
    const start = performance.now();
    try {
      const response = await fetch("/healthz", { cache: "no-store" });
      await response.text();
      if (!response.ok) return null;
    } catch {
      return null;
    }
    times.push(performance.now() - start);
  }
  times.sort((a, b) => a - b);
  return times[1];
}

/** The ICE candidates a peer connection gathers with these ICE servers (up to a time limit). */
async function gatherCandidates(/** @type {RTCIceServer[]} */ iceServers, timeoutMs = 5000) {
  const pc = new RTCPeerConnection({ iceServers });
  /** @type {string[]} */
  const types = [];
  try {
    pc.createDataChannel("check");
    const done = new Promise((resolve) => {
      pc.addEventListener("icecandidate", (e) => {
        if (e.candidate?.candidate) types.push(e.candidate.type ?? "host");
        else resolve(undefined);
      });
      setTimeout(resolve, timeoutMs);
    });
    await pc.setLocalDescription(await pc.createOffer());
    await done;
  } finally {
    pc.close();
  }
  return types;
}

/** @param {RTCIceServer[]} [iceServers] @returns {Promise<NetworkCheck>} */
export async function checkNetwork(iceServers = []) {
  const [rttMs, types] = await Promise.all([serverRoundTrip(), gatherCandidates(iceServers).catch(() => [])]);
  return { rttMs, candidates: types.length, types: [...new Set(types)] };
}
