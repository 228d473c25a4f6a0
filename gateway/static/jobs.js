// One job's card in the gallery, built once and then updated in place (so that keyboard
// focus, on its Cancel button say, survives every update). Text goes in as textContent
// only: a prompt is the user's text and never markup.

const ENDED = new Set(["succeeded", "failed", "rejected", "canceled", "expired"]);

export function ended(job) {
  return ENDED.has(job.status);
}

export function shortPrompt(job) {
  const prompt = job.request.prompt;
  return prompt.length > 40 ? `${prompt.slice(0, 39)}…` : prompt;
}

let serial = 0;

function element(tag, className, parent) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (parent) parent.append(node);
  return node;
}

// A card: {node, update(job), progress(step, steps)}. `onCancel(job)` runs on Cancel;
// `onImageError(job)` when the image does not load (its presigned URL expired, say).
export function jobCard(job, { onCancel, onImageError }) {
  const n = ++serial;
  const node = element("li", "job");
  node.dataset.jobId = job.id;
  node.tabIndex = -1; // focusable from script only (see update), not a tab stop
  const prompt = element("p", "prompt", node);
  prompt.id = `job-${n}-prompt`;
  node.setAttribute("aria-labelledby", prompt.id);
  const meta = element("p", "meta", node);
  const statusLine = element("p", "meta", node);
  statusLine.append("Status: ");
  const status = element("span", "status", statusLine);

  const progressBox = element("div", "progress-box", node);
  const label = element("label", "progress-label", progressBox);
  const bar = element("progress", "", progressBox);
  bar.id = `job-${n}-progress`;
  label.htmlFor = bar.id;

  const image = element("img", "", node);
  image.hidden = true;
  image.decoding = "async";
  image.addEventListener("error", () => {
    if (image.dataset.src) onImageError(current);
  });
  const reason = element("p", "reason", node);
  reason.hidden = true;
  const cancel = element("button", "secondary cancel", node);
  cancel.type = "button";
  cancel.textContent = "Cancel";
  cancel.setAttribute("aria-describedby", prompt.id);
  // aria-disabled, not disabled: a disabled button loses keyboard focus to the page.
  cancel.addEventListener("click", () => {
    if (cancel.getAttribute("aria-disabled") === "true") return;
    cancel.setAttribute("aria-disabled", "true");
    cancel.textContent = "Canceling…";
    onCancel(current, () => {
      cancel.removeAttribute("aria-disabled");
      cancel.textContent = "Cancel";
    });
  });

  let current = job;

  function update(next) {
    current = next;
    const request = next.request;
    node.dataset.status = next.status;
    prompt.textContent = request.prompt;
    const seed = next.result?.seed ?? request.seed;
    meta.textContent = [
      `${request.width}×${request.height}`,
      `${request.steps} steps`,
      seed === null || seed === undefined ? "any seed" : `seed ${seed}`,
      next.priority,
      new Date(next.created_at).toLocaleTimeString(),
    ].join(" · ");
    status.textContent = next.status;
    if (ended(next)) {
      // Focus on a button about to vanish would fall to the page: keep it on the card.
      if (document.activeElement === cancel) node.focus();
      progressBox.hidden = true;
      cancel.hidden = true;
    } else {
      progressBox.hidden = false;
      cancel.hidden = false;
      if (next.progress) progress(next.progress.step, next.progress.steps);
      else if (next.status === "queued") queued(next);
      else starting(request.steps);
    }
    showImage(next);
    showReason(next);
  }

  // Queued: an indeterminate bar (no value), with the place in line where known.
  function queued(next) {
    bar.removeAttribute("value");
    bar.max = next.request.steps;
    const place = next.queue_position;
    label.textContent =
      place === null || place === undefined ? "Queued" : `Queued: ${place} ahead in line`;
  }

  function starting(steps) {
    bar.max = steps;
    bar.value = 0;
    label.textContent = `Starting: 0 of ${steps} steps`;
  }

  function progress(step, steps) {
    if (ended(current)) return;
    if (current.status === "queued") {
      current = { ...current, status: "running" };
      node.dataset.status = "running";
      status.textContent = "running";
    }
    bar.max = steps;
    bar.value = step;
    label.textContent = `Step ${step} of ${steps}`;
  }

  function showImage(next) {
    const url = next.result?.url;
    if (next.status !== "succeeded" || !url) {
      image.hidden = true;
      return;
    }
    if (image.dataset.src !== url) {
      image.dataset.src = url;
      image.alt = `Generated image: ${next.request.prompt}`;
      if (next.result.width) image.width = next.result.width;
      if (next.result.height) image.height = next.result.height;
      image.src = url; // presigned: an <img> cannot send the key, the URL needs none
    }
    image.hidden = false;
  }

  function showReason(next) {
    const error = next.error;
    if (!error || next.status === "succeeded") {
      reason.hidden = true;
      return;
    }
    const parts = [error.reason, error.detail].filter(Boolean);
    if (Number.isFinite(error.retry_after_ms)) {
      parts.push(`retry after ${Math.ceil(error.retry_after_ms / 1000)} s`);
    }
    reason.textContent = parts.join(": ") || next.status;
    reason.hidden = false;
  }

  update(job);
  return { node, update, progress, get job() { return current; } };
}
