// The server's routes as the page calls them, and its JSON errors read into one sentence.

const INFER_PATH = "/infer";
export const MODELS_URL = "/v1/models";
export const MODEL_URL = "/v1/model";

/** POST /infer?format=FORMAT, and &model=NAME when a model was chosen (an older server has no picker). */
export function inferUrl(format, model) {
  const query = new URLSearchParams({ format });
  if (model) query.set("model", model);
  return `${INFER_PATH}?${query}`;
}

/** GET `url`'s JSON; an Error whose message says why not (unreachable, or the server's own error). */
export async function getJson(url) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch (error) {
    throw new Error(`The server could not be reached (${error.message}).`);
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

/** The JSON error's message (and its code and request ID), or what the status says when the body is not one. */
export async function errorText(response) {
  const text = await response.text();
  let error = null;
  try {
    error = JSON.parse(text).error;
  } catch (_) {
    error = null;
  }
  const retry = response.headers.get("Retry-After");
  const after = retry ? ` Retry after ${retry} s.` : "";
  if (error && error.message) {
    const id = error.request_id ? ` (request ID ${error.request_id})` : "";
    return `${response.status} ${error.code || ""}: ${error.message}${id}.${after}`;
  }
  return `${response.status} ${response.statusText || "error"}, with no error message.${after}`;
}
