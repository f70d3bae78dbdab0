// The REST API of docs/api.md with the tab's token; problems (RFC 9457) become ApiError.

import { token } from "./auth.js";

export class ApiError extends Error {
  /** @param {number} status @param {string} code @param {string} message */
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * @param {string} path below /api/v1
 * @param {{method?: string, body?: unknown, query?: Record<string, string | undefined>}} [options]
 * @returns {Promise<any>}
 */
export async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(`/api/v1${path}`, location.origin);
  for (const [k, v] of Object.entries(query ?? {})) if (v) url.searchParams.set(k, v);
  /** @type {Record<string, string>} */
  const headers = { Authorization: `Bearer ${token() ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    throw new ApiError(response.status, data?.code ?? "error", data?.detail ?? response.statusText);
  }
  return data;
}

/** @type {Promise<Record<string, string[]>> | null} */
let rolesLoaded = null;

/** What each role may do (the server's role table). */
export function rolePermissions() {
  rolesLoaded ??= fetch("/web/roles.json").then((r) => r.json());
  return rolesLoaded;
}

export async function may(/** @type {string} */ role, /** @type {string} */ permission) {
  return ((await rolePermissions())[role] ?? []).includes(permission);
}
