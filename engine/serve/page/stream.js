// A running video job's stream (GET /v1/videos/{id}/content?stream=true: a fragmented MP4 growing while the
// video is decoded) played through Media Source Extensions: fetched with the token like every call, its whole
// top-level boxes appended as they arrive. The init segment names the codec (its avcC box).

import { request } from "./api.js";

const MEDIA_BOXES = new Set(["ftyp", "moov", "moof", "mdat"]);  // the rest (the closing mfra) is left out
const MAX_STREAMS = 2;  // a browser opens few connections per host: leave room for the page's own calls
let streaming = 0;

function boxType(bytes, at) {
  return String.fromCharCode(...bytes.subarray(at + 4, at + 8));
}

/** The codec string of an init segment, from its avcC box (profile, compatibility, level), e.g. avc1.64001f. */
function codecOf(init) {
  const hex = (byte) => byte.toString(16).padStart(2, "0");
  for (let at = 4; at + 8 <= init.length; at++) {
    if (boxType(init, at - 4) === "avcC") return `avc1.${hex(init[at + 5])}${hex(init[at + 6])}${hex(init[at + 7])}`;
  }
  return "avc1.640028";
}

function joined(parts) {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function appended(buffer, bytes) {
  return new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", reject, { once: true });
    buffer.appendBuffer(bytes);
  });
}

/** Play the stream at ``path`` in ``video`` until it ends or ``signal`` aborts; false when none could start. */
export async function playStream(video, path, signal) {
  if (streaming >= MAX_STREAMS || !window.MediaSource) return false;
  streaming++;
  try {
    const response = await request(`${path}?stream=true`, { signal });
    if (!response.ok) return false;
    const source = new MediaSource();
    video.src = URL.createObjectURL(source);
    await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
    const reader = response.body.getReader();
    let pending = new Uint8Array(0);
    let buffer = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      pending = joined([pending, value]);
      let whole = 0;  // whole boxes at the front of pending
      const media = [];
      while (whole + 8 <= pending.length) {
        const size = new DataView(pending.buffer, pending.byteOffset + whole).getUint32(0);
        if (size < 8 || whole + size > pending.length) break;
        if (MEDIA_BOXES.has(boxType(pending, whole))) media.push(pending.subarray(whole, whole + size));
        whole += size;
      }
      if (!media.length) {
        pending = pending.slice(whole);
        continue;
      }
      const bytes = joined(media);
      buffer ??= source.addSourceBuffer(`video/mp4; codecs="${codecOf(bytes)}"`);
      await appended(buffer, bytes);
      pending = pending.slice(whole);
      if (video.paused) video.play().catch(() => {});
    }
    if (source.readyState === "open") source.endOfStream();
    return true;
  } catch (error) {
    if (error.name === "AbortError") return true;
    throw error;
  } finally {
    streaming--;
  }
}
