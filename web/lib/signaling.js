// The /consult namespace: requests with acknowledgements, announcements as events, and the
// reconnect rule of docs/protocol.md (same user + device label gets its seat back).

/**
 * @typedef {{code: string, message: string, event?: string}} ProtocolError
 * @typedef {{ok: true, result?: Record<string, unknown>} | {ok: false, error: ProtocolError}} Ack
 */

/** A refused request: `code` is one of the protocol's error codes. */
export class SignalError extends Error {
  /** @param {string} code @param {string} message */
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** Connect refusals that come from the token (docs/protocol.md, Authentication). */
export function isAuthRefusal(/** @type {string} */ message) {
  return /token|invite|role|claim|auth payload/i.test(message);
}

export class Signaling {
  /**
   * @param {{token: string, consultationId: string, device: string, url?: string}} options
   */
  constructor({ token, consultationId, device, url = "" }) {
    this.consultationId = consultationId;
    this.device = device;
    /** @type {Map<string, Set<(data: any) => void>>} */
    this.handlers = new Map();
    /** Set once joined; a reconnect then joins again with the same device label. */
    this.joined = false;
    /** Whether the next rejoin keeps the seat's media connections (docs/protocol.md, join). */
    this.keepMedia = true;
    // @ts-ignore: the vendored socket.io client defines the global `io`.
    this.socket = /** @type {any} */ (globalThis.io)(`${url}/consult`, {
      auth: { token, consultation_id: consultationId },
      autoConnect: false,
      // WebSocket first: a long-polling session lives on one worker, and behind several
      // (docs/protocol.md, "Several workers") its next request may reach another. Polling
      // stays the fallback where a proxy blocks WebSocket.
      transports: ["websocket", "polling"],
      tryAllTransports: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 3000,
    });
    /** How many of each server event arrived (for tests and support). @type {Map<string, number>} */
    this.heard = new Map();
    this.socket.onAny((/** @type {string} */ event, /** @type {any} */ data) => {
      this.heard.set(event, (this.heard.get(event) ?? 0) + 1);
      this.fire(event, data);
    });
    this.socket.on("connect", () => {
      this.fire("_connected", { reconnect: this.joined });
      if (this.joined) this.rejoin();
    });
    this.socket.on("disconnect", (/** @type {string} */ reason) => {
      // "io server disconnect": the server ended it (session ended, removed, denied, replaced):
      // socket.io does not retry, and neither do we.
      this.fire("_disconnected", { reason, willRetry: reason !== "io server disconnect" && reason !== "io client disconnect" });
    });
    this.socket.on("connect_error", (/** @type {Error} */ err) => {
      this.fire("_connect_error", { message: err.message, willRetry: this.socket.active });
    });
  }

  /** Resolves on the first connection; rejects with the server's refusal reason. */
  connect() {
    return new Promise((resolve, reject) => {
      const ok = () => { this.socket.off("connect_error", bad); resolve(undefined); };
      const bad = (/** @type {Error} */ err) => {
        if (!this.socket.active) { this.socket.off("connect", ok); reject(new SignalError("refused", err.message)); }
      };
      this.socket.once("connect", ok);
      this.socket.on("connect_error", bad);
      this.socket.connect();
    });
  }

  /** @param {string} event @param {(data: any) => void} handler */
  on(event, handler) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event)?.add(handler);
    return () => this.handlers.get(event)?.delete(handler);
  }

  /** @param {string} event @param {any} data */
  fire(event, data) {
    for (const handler of this.handlers.get(event) ?? []) {
      try { handler(data); } catch (err) { console.error(`handler of ${event} failed`, err); }
    }
  }

  /** Resolves with the next `event` (registered before the request that causes it is sent). */
  next(/** @type {string} */ event) {
    return new Promise((resolve) => { const off = this.on(event, (d) => { off(); resolve(d); }); });
  }

  /**
   * Sends a request and waits for its acknowledgement.
   * @param {string} event @param {Record<string, unknown>} [payload]
   * @returns {Promise<Record<string, unknown>>} the ack's result ({} when none)
   */
  async request(event, payload = {}, timeoutMs = 15000) {
    // socket.io would buffer it until the next connection, where a reconnect's own `join`
    // may overtake it: refuse at once instead.
    if (!this.socket.connected) throw new SignalError("disconnected", `not connected: ${event}`);
    /** @type {Ack} */
    let ack;
    try {
      ack = await this.socket.timeout(timeoutMs).emitWithAck(event, payload);
    } catch {
      throw new SignalError("timeout", `no answer to ${event}`);
    }
    if (!ack.ok) throw new SignalError(ack.error.code, ack.error.message);
    return ack.result ?? {};
  }

  async join() {
    await this.request("join", { consultation_id: this.consultationId, device: this.device });
    this.joined = true;
  }

  /** Leaves the room; a reconnect no longer joins again by itself. */
  async leave() {
    await this.request("leave");
    this.joined = false;
  }

  async rejoin() {
    const keepMedia = this.keepMedia;
    this.keepMedia = true;
    try {
      await this.request("join", { consultation_id: this.consultationId, device: this.device, keep_media: keepMedia });
    } catch (err) {
      this.fire("_rejoin_failed", err);
    }
  }

  /**
   * Drops the transport so socket.io reconnects now: after a network loss the heartbeat alone
   * would notice only after ping interval + timeout (45 s by default). The seat is taken back
   * with its media connections, unless `keepMedia` is false (they then start afresh).
   */
  reconnectNow(keepMedia = true) {
    this.keepMedia = keepMedia;
    if (this.socket.connected) this.socket.io.engine.close();
  }

  get connected() {
    return !!this.socket.connected;
  }

  close() {
    this.joined = false;
    this.socket.disconnect();
  }
}
