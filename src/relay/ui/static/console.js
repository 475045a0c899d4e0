// The console's only script, served from this server (the Content-Security-Policy allows no
// other): copy buttons, a confirmation before a form that cannot be undone, and a running
// background response's events as they come.
"use strict";

document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  try {
    await navigator.clipboard.writeText(source.textContent.trim());
    button.textContent = "Copied";
  } catch {
    // No clipboard (a page not served over HTTPS or loopback): select it for Ctrl+C.
    window.getSelection().selectAllChildren(source);
    button.textContent = "Selected: press Ctrl+C";
  }
});

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
    return;
  }
  // The page is left for the form's answer: a live section must not reload it meanwhile.
  const live = document.getElementById("live");
  if (live) live.dataset.leaving = "true";
});

// The resume stream (server-sent events, read with fetch so that every event type arrives
// the same way): text deltas are shown as they come, the last event's type is the state,
// and the page reloads when the stream ends (the response has ended, cancelled ones
// included, which have no terminal event), to show it as stored.

async function follow(live) {
  const state = live.querySelector("#live-state");
  const text = live.querySelector("#live-text");
  const answer = await fetch(live.dataset.events, { credentials: "same-origin" });
  if (!answer.ok) {
    state.textContent = `the events could not be read (${answer.status})`;
    return;
  }
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    const frames = buffered.split("\n\n");
    buffered = frames.pop();
    for (const frame of frames) {
      const data = frame.split("\n").find((line) => line.startsWith("data: "));
      // A keep-alive comment has no data; the stream's last frame is "[DONE]".
      if (!data || data === "data: [DONE]") continue;
      const event = JSON.parse(data.slice(6));
      state.textContent = event.type;
      if (event.type === "response.output_text.delta") text.textContent += event.delta;
    }
  }
  if (live.dataset.leaving) return;
  state.textContent += " · reloading";
  window.location.reload();
}

const live = document.getElementById("live");
if (live) follow(live);

// The project picker switches on choosing (its button does the same without scripts).
document.addEventListener("change", (event) => {
  if (event.target.matches("select[data-autosubmit]")) event.target.form.requestSubmit();
});
