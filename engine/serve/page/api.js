// The service's API as the page uses it: the bearer token (asked for once, kept in this tab's sessionStorage),
// answers and errors as the API gives them, and server-sent events read with fetch(): EventSource cannot send
// an Authorization header, and a token in a URL would end up in logs.

const TOKEN_KEY = "engine-api-token";

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message ?? `HTTP ${status}`);
    this.status = status;
    this.param = error.param ?? null;
    this.code = error.code ?? null;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function withToken(init) {
  const headers = new Headers(init.headers);
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  return { ...init, headers };
}

let asking = null;

/** Show the token dialog (one at a time, however many requests were refused) until a token is given. */
function askToken(refused) {
  asking ??= new Promise((resolve) => {
    const dialog = document.getElementById("token-dialog");
    const input = document.getElementById("token-input");
    document.getElementById("token-error").hidden = !refused;
    dialog.addEventListener("cancel", (event) => event.preventDefault());
    dialog.addEventListener("close", () => {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      asking = null;
      resolve();
    }, { once: true });
    dialog.showModal();
  });
  return asking;
}

/** The service could not be reached (fetch() says only "Failed to fetch", or its browser's own words). */
export class Unreachable extends Error {
  constructor(what) {
    super(`${what}: no answer from the service (stopped, restarting, or the network is down)`);
  }
}

async function reaching(what, promise) {
  try {
    return await promise;
  } catch (error) {
    if (error instanceof TypeError) throw new Unreachable(what);  // what fetch() and stream reads throw
    throw error;
  }
}

/** fetch() with the token; a 401 asks for the token (again) and repeats the request. */
export async function request(path, init = {}) {
  for (;;) {
    const response = await reaching(`${init.method ?? "GET"} ${path}`, fetch(path, withToken(init)));
    if (response.status !== 401) return response;
    await askToken(Boolean(token()));
  }
}

async function failure(response) {
  const body = await response.json().catch(() => ({}));
  return new ApiError(response.status, body.error ?? {});
}

/** The JSON of a successful answer; an ApiError carrying the API's own message otherwise. */
export async function json(path, init = {}) {
  const response = await request(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** A URL a <video> or <img> can load: the path itself, or, since no media element sends a token, a blob. */
export async function mediaUrl(path) {
  if (!token()) return path;
  const response = await request(path);
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}

function dispatch(block, onEvent) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (data.length) onEvent(name, JSON.parse(data.join("\n")));
}

/** Call onOpen() once the stream at path is open, then onEvent(name, data) for each server-sent event on it;
 * resolves when the stream ends, throws Unreachable when the service cannot be reached or stops answering. */
export async function readEvents(path, onOpen, onEvent) {
  const response = await request(path, { headers: { Accept: "text/event-stream" } });
  if (!response.ok) throw await failure(response);
  onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  let held = "";  // a chunk may end between the \r and \n of a line end
  for (;;) {
    const { value, done } = await reaching(`events of ${path}`, reader.read());
    if (done) return;
    const chunk = held + value;
    held = chunk.endsWith("\r") ? "\r" : "";
    text += chunk.slice(0, chunk.length - held.length).replace(/\r\n?/g, "\n");
    for (let end = text.indexOf("\n\n"); end >= 0; end = text.indexOf("\n\n")) {
      dispatch(text.slice(0, end), onEvent);
      text = text.slice(end + 2);
    }
  }
}
