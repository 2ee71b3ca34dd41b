// The jobs, newest first: status, a progress bar over the denoising steps, the error as the API gives it, a
// cancel button while a video job has not finished, the latest denoising preview while it runs, and the finished
// video or image in place.

import { json, mediaUrl } from "./api.js";
import { playStream } from "./stream.js";

const FINISHED = new Set(["completed", "failed", "cancelled"]);

function part(tag, className, text = "") {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text;
  return node;
}

function contentPath(job) {
  return `/v1/${job.object}s/${job.id}/content`;
}

function progressLabel(job) {
  const steps = job.steps ? ` · step ${Math.round((job.progress * job.steps) / 100)}/${job.steps}` : "";
  return `${job.progress}%${steps}${stepCacheLabel(job)}`;
}

/** What step caching skipped, once the job says (its DiT stages' passes run and skipped, summed). */
function stepCacheLabel(job) {
  const stages = Object.values(job.step_cache ?? {});
  const skipped = stages.reduce((sum, s) => sum + s.passes_skipped, 0);
  const total = stages.reduce((sum, s) => sum + s.passes_run + s.passes_skipped, 0);
  return total && skipped ? ` · ${skipped} of ${total} DiT passes skipped` : "";
}

/** The video's length: its frames at its frame rate (9 frames at 16 fps play 0.5625 s). */
function videoSeconds(job) {
  return job.num_frames && job.fps ? Number((job.num_frames / job.fps).toFixed(4)) : null;
}

function describeSize(job) {
  const seconds = videoSeconds(job);
  return [job.size, seconds !== null && `${seconds} s`].filter(Boolean).join(" · ");
}

export class JobList {
  constructor(list) {
    this.list = list;
    this.jobs = new Map();  // id -> what is known of the job
  }

  /** Replace every card (the jobs as the service lists them on connecting, newest first). */
  showAll(jobs) {
    this.list.replaceChildren();
    this.jobs.clear();
    for (const job of [...jobs].reverse()) this.show(job);
  }

  /** Add or update the job's card. The API's answer to a cancel lacks the prompt and steps the service's events
   * add: what is known of a job is merged. */
  show(job) {
    const known = this.jobs.get(job.id);
    const merged = { ...known, ...job };
    this.jobs.set(job.id, merged);
    if (!known) this.list.prepend(this.newCard(merged));
    this.update(this.list.querySelector(`.job[data-job-id="${job.id}"]`), merged);
  }

  newCard(job) {
    const card = part("li", "job");
    card.dataset.jobId = job.id;
    const head = part("div", "job-head");
    const cancel = part("button", "cancel", "Cancel");
    cancel.type = "button";
    cancel.addEventListener("click", () => this.cancel(card, job.id));
    head.append(part("span", "job-status"), part("code", "job-id", job.id), part("span", "job-size"), cancel);
    const progress = part("div", "job-progress");
    const bar = part("progress", "");
    bar.max = 100;
    progress.append(bar, part("span", "progress-label"));
    const preview = part("img", "job-preview");
    preview.hidden = true;
    card.append(head, part("p", "job-prompt"), progress, part("pre", "job-error"), preview,
                part("div", "job-output"));
    return card;
  }

  update(card, job) {
    card.dataset.status = job.status;
    card.querySelector(".job-status").textContent = job.status.replace("_", " ");
    card.querySelector(".job-prompt").textContent = job.prompt ?? "";
    card.querySelector(".job-size").textContent = describeSize(job);
    card.querySelector("progress").value = job.progress;
    card.querySelector(".progress-label").textContent = progressLabel(job);
    // Only video jobs can be cancelled through the API (DELETE /v1/videos/{id}).
    card.querySelector(".cancel").hidden = FINISHED.has(job.status) || job.object !== "video";
    const error = job.error ? `${job.error.code}: ${job.error.message ?? ""}` : "";
    this.showError(card, error);
    if (job.status === "in_progress" && job.object === "video") this.showStream(card, job);
    if (FINISHED.has(job.status)) card.streaming?.abort();
    if (job.status === "completed") this.showOutput(card, job);
    this.showPreview(card, job);
  }

  /** The latest denoising preview (job.preview: its step) while the job runs; gone once the output is there. */
  async showPreview(card, job) {
    const image = card.querySelector(".job-preview");
    const step = job.preview?.step;
    if (FINISHED.has(job.status)) image.hidden = true;
    if (FINISHED.has(job.status) || step === undefined || image.dataset.step === String(step)) return;
    image.dataset.step = String(step);
    image.alt = `preview at step ${step}/${job.preview.total_steps}`;
    image.title = image.alt;
    try {
      image.src = await mediaUrl(`/v1/${job.object}s/${job.id}/preview?step=${step}`);
      image.hidden = false;
    } catch (error) {
      this.showError(card, error.message);
    }
  }

  /** While a video job runs, its video as it is decoded (stream.js); the finished video replaces it. */
  showStream(card, job) {
    if (card.streaming) return;
    card.streaming = new AbortController();
    const video = document.createElement("video");
    video.className = "job-stream";
    Object.assign(video, { controls: true, muted: true, playsInline: true, hidden: true });
    card.querySelector(".job-output").append(video);
    video.addEventListener("loadeddata", () => { video.hidden = false; }, { once: true });
    playStream(video, contentPath(job), card.streaming.signal).catch((error) => console.warn(job.id, error));
  }

  showError(card, text) {
    const error = card.querySelector(".job-error");
    error.textContent = text;
    error.hidden = !text;
  }

  async showOutput(card, job) {
    const output = card.querySelector(".job-output");
    output.querySelector(".job-stream")?.remove();
    if (output.childElementCount) return;
    const media = job.object === "video" ? document.createElement("video") : document.createElement("img");
    output.append(media);
    if (job.object === "video") Object.assign(media, { controls: true, muted: true, loop: true, playsInline: true });
    else media.alt = job.prompt ?? job.id;
    try {
      media.src = await mediaUrl(contentPath(job));
    } catch (error) {
      this.showError(card, error.message);
    }
  }

  async cancel(card, id) {
    try {
      this.show(await json(`/v1/videos/${id}`, { method: "DELETE" }));
    } catch (error) {
      this.showError(card, error.message);
    }
  }
}
