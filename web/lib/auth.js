// The token: from a link's URL fragment (never sent to the server in a URL) into this tab's
// sessionStorage, and the fragment wiped from the address bar and history.

const KEY = "telemed.token";

/** @typedef {{sub: string, name: string, role: string, org: string, cid?: string, exp?: number, inv?: boolean}} Claims */

/** Moves `#token=…` into sessionStorage; returns whether the fragment had one. */
export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return false;
  sessionStorage.setItem(KEY, token);
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

export function setToken(/** @type {string} */ token) { sessionStorage.setItem(KEY, token); }
export function token() { return sessionStorage.getItem(KEY); }
export function signOut() { sessionStorage.removeItem(KEY); }

/** The token's claims, read for display only: the server verifies them. @returns {Claims | null} */
export function claims(/** @type {string | null} */ jwt = token()) {
  if (!jwt) return null;
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

export function expired(/** @type {Claims | null} */ c) {
  return !!c?.exp && c.exp * 1000 < Date.now();
}

/** A device label for this tab, kept across reloads: the server gives the seat back to it. */
export function deviceLabel() {
  let label = sessionStorage.getItem("telemed.device");
  if (!label) {
    label = `web-${crypto.getRandomValues(new Uint32Array(1))[0].toString(36)}`;
    sessionStorage.setItem("telemed.device", label);
  }
  return label;
}
