// The form that submits a job to the service's endpoint, with only the fields its model takes, the service's
// defaults filled in, and the API's error shown as it comes (the field at fault marked).

import { json } from "./api.js";

const VALUE_FIELDS = ["prompt", "negative_prompt", "width", "height", "num_frames", "num_inference_steps", "seed"];

function fillDefaults(form, service) {
  const defaults = service.defaults;
  for (const name of ["width", "height", "num_frames"]) {
    if (defaults[name] !== undefined) form.elements[name].value = defaults[name];
  }
  if (defaults.steps !== undefined) form.elements.num_inference_steps.value = defaults.steps;
  for (const [name, range] of Object.entries(service.bounds ?? {})) {  // the family's bounds, the limits' maxima
    const input = form.elements[name === "steps" ? "num_inference_steps" : name];
    if (range.min !== undefined) input.min = range.min;
    if (range.max !== undefined) input.max = range.max;
  }
  for (const name of ["seed", "negative_prompt"]) {  // left empty, the service's default applies
    if (defaults[name] !== undefined && defaults[name] !== null) form.elements[name].placeholder = defaults[name];
  }
}

function fitToModel(form, service) {
  const only = { video: service.makes_video, image: Boolean(service.image_field) };
  for (const label of form.querySelectorAll("[data-only]")) {
    const shown = only[label.dataset.only];
    label.hidden = !shown;
    for (const input of label.querySelectorAll("input")) input.disabled = !shown;
  }
  form.elements.image.required = service.endpoint === "/v1/images/edits";
  form.elements.image.dataset.param = service.image_field ?? "image";  // what the API calls it in errors
}

/** The body as the API takes it: multipart, empty fields left out, the image under the model's field name. */
function body(form, service) {
  const data = new FormData();
  for (const name of VALUE_FIELDS) {
    const input = form.elements[name];
    if (!input.disabled && input.value.trim() !== "") data.append(name, input.value.trim());
  }
  const image = form.elements.image.files[0];
  if (service.image_field && image) data.append(service.image_field, image);
  if (!service.makes_video) data.append("response_format", "url");
  return data;
}

function showError(form, error) {
  const message = form.querySelector("#submit-error");
  message.textContent = error ? error.message : "";
  message.hidden = !error;
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  const param = error?.param;
  const input = param && form.querySelector(`[name="${param}"], [data-param="${param}"]`);
  if (input) input.setAttribute("aria-invalid", "true");
}

/** Fit the form to the service and submit jobs from it (the new job reaches the list through the service's
 * events, which also carry every change after). */
export function setUpForm(form, service) {
  fillDefaults(form, service);
  fitToModel(form, service);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(form, null);
    try {
      await json(service.endpoint, { method: "POST", body: body(form, service) });
    } catch (error) {
      showError(form, error);
    }
  });
}
