// The page: the service's graph and model once, then its events (jobs, replica states, queue depth) for as long
// as the page is open, reconnecting when the stream breaks (a restart of the service).

import { json, readEvents } from "./api.js";
import { setUpForm } from "./form.js";
import { drawGraph, showState } from "./graph.js";
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
  document.getElementById("queue").textContent = `queued ${state.queued} · running ${state.running}`;
  showState(graph, state);
  const scaling = document.getElementById("scaling");
  scaling.replaceChildren(...state.scale_events.map((event) => {
    const item = document.createElement("li");
    const when = new Date(event.time * 1000).toLocaleTimeString();
    item.textContent = `${when} scale ${event.direction} ${event.node}[${event.replica}]: ${event.detail}`;
    return item;
  }));
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
      await readEvents("/v1/service/events", (name, data) => handlers[name]?.(data));
      showPageError("");
    } catch (error) {
      showPageError(`events: ${error.message}`);
    }
    showStatus("disconnected");
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

main().catch((error) => showPageError(`the service did not answer: ${error.message}`));
