// The page: the service's graph and model once, then its events (jobs, replica states, queue depth) for as long
// as the page is open, reconnecting when the stream breaks (a restart of the service).

import { json, readEvents } from "./api.js";
import { setUpForm } from "./form.js";
import { drawGraph, markStale, showState } from "./graph.js";
import { JobList } from "./jobs.js";

const RECONNECT_MS = 2000;
const graph = document.getElementById("graph");
const jobs = new JobList(document.getElementById("jobs"));

function showStatus(status) {
  const pill = document.getElementById("status");
  pill.dataset.status = status;
  pill.textContent = status;
}

function showPageError(text) {
  const error = document.getElementById("page-error");
  error.textContent = text;
  error.hidden = !text;
}

function showServiceState(state) {
  showStatus(state.status);
  const queue = document.getElementById("queue");
  queue.textContent = `queued ${state.queued} · running ${state.running}`;
  delete queue.dataset.stale;
  queue.title = "";
  showState(graph, state);
  const scaling = document.getElementById("scaling");
  scaling.replaceChildren(...state.scale_events.map((event) => {
    const item = document.createElement("li");
    const when = new Date(event.time * 1000).toLocaleTimeString();
    const replica = event.replica === null ? "" : `[${event.replica}]`;  // null: no room, nothing started
    item.textContent = `${when} scale ${event.direction} ${event.node}${replica}: ${event.detail}`;
    return item;
  }));
}

/** Nothing shown of the service's state holds while its events do not come: say so, and since when. */
function showDisconnected() {
  showStatus("disconnected");
  const queue = document.getElementById("queue");
  if (!queue.dataset.stale) {
    const since = new Date().toLocaleTimeString();
    queue.dataset.stale = "true";
    queue.title = `as of ${since}, when the service stopped answering`;
    if (queue.textContent) queue.textContent = `${queue.textContent} (as of ${since})`;
  }
  markStale(graph);
}

function showModel(service) {
  document.title = `${service.graph} · engine serve`;
  document.getElementById("title").textContent = service.graph;
  const model = service.model;
  document.getElementById("model").textContent = `${model.family} ${model.task} · ${model.path} · ${model.dtype}`;
}

const handlers = {
  jobs: (list) => jobs.showAll(list),
  job: (job) => jobs.show(job),
  state: showServiceState,
};

async function follow() {
  for (;;) {
    try {
      await readEvents("/v1/service/events", () => showPageError(""), (name, data) => handlers[name]?.(data));
      showPageError(`events: the service ended the stream; reconnecting every ${RECONNECT_MS / 1000} s`);
    } catch (error) {
      showPageError(`events: ${error.message}; reconnecting every ${RECONNECT_MS / 1000} s`);
    }
    showDisconnected();
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

async function main() {
  const service = await json("/v1/service");
  showModel(service);
  drawGraph(graph, service);
  showServiceState(service.state);
  setUpForm(document.getElementById("submit"), service);
  await follow();
}

main().catch((error) => showPageError(`the page could not start: ${error.message}`));
