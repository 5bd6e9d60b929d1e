// The server's routes as the page calls them, the API key it sends them, and its JSON errors read into one sentence.

const INFER_PATH = "/infer";
export const MODELS_URL = "/v1/models";
export const MODEL_URL = "/v1/model";
// A server with SEGAPP_API_KEYS_FILE answers 401 without a key. The key a person types is kept for this tab only
// (sessionStorage: gone when the tab closes, never sent anywhere but in the Authorization header; not localStorage
// nor a cookie, which would outlive the tab or go with every request by themselves).
const KEY_ITEM = "segapp-api-key";

/** POST /infer?format=FORMAT, and &model=NAME when a model was chosen (an older server has no picker). */
export function inferUrl(format, model) {
  const query = new URLSearchParams({ format });
  if (model) query.set("model", model);
  return `${INFER_PATH}?${query}`;
}

let askForKey = null; // (message, refused) => a Promise of the key a person typed; set by useKeyForm

/** fetch(url, init) with the tab's API key, if it has one; a 401 asks for a key (again) and sends once more. */
export async function apiFetch(url, init = {}) {
  for (;;) {
    const key = storedKey();
    const headers = new Headers(init.headers);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(url, { ...init, headers });
    if (response.status !== 401 || !askForKey) return response;
    const now = storedKey();
    if (now && now !== key) continue; // a key was typed while this request was on its way: try that one
    if (key && now === key) forgetKey(); // refused: not sent again, not even after a reload
    const message = await errorText(response);
    await askForKey(message, Boolean(key));
  }
}

/** GET `url`'s JSON; an Error whose message says why not (unreachable, or the server's own error). */
export async function getJson(url) {
  let response;
  try {
    response = await apiFetch(url, { headers: { Accept: "application/json" } });
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

// ---- the API key ----

// sessionStorage throws where the browser forbids storage: the key then lasts until the page is left.
let keptInPage = null;

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM);
  } catch (_) {
    return keptInPage;
  }
}

function keepKey(key) {
  keptInPage = key;
  try {
    sessionStorage.setItem(KEY_ITEM, key);
  } catch (_) {
    // kept in the page only
  }
}

function forgetKey() {
  keptInPage = null;
  try {
    sessionStorage.removeItem(KEY_ITEM);
  } catch (_) {
    // nothing was stored
  }
}

/** Ask for a key with the page's form ({form, input, message}) whenever the server answers 401. Requests refused at
 * the same time wait for the same answer; the form hides once a key is given, and shows again if it is refused. */
export function useKeyForm(view) {
  let waiting = null; // {promise, resolve} while the form is shown
  view.form.addEventListener("submit", (event) => {
    event.preventDefault(); // nothing is submitted anywhere: the key stays in this tab
    const key = view.input.value.trim();
    if (!waiting) return;
    if (!/^[!-~]+$/.test(key)) { // a header line holds no spaces, line breaks or other letters
      view.message.textContent = "An API key is printable ASCII with no spaces (sgk_…).";
      return;
    }
    keepKey(key);
    view.input.value = "";
    view.form.hidden = true;
    const { resolve } = waiting;
    waiting = null;
    resolve(key);
  });
  askForKey = (message, refused) => {
    view.message.textContent = refused
      ? `The key was refused: ${message} Type it again, or another.`
      : `This server needs an API key: ${message}`;
    if (!waiting) {
      let resolve;
      const promise = new Promise((done) => { resolve = done; });
      waiting = { promise, resolve };
      view.form.hidden = false;
      view.input.focus();
    }
    return waiting.promise;
  };
}
