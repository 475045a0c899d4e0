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
  if (question && !window.confirm(question)) event.preventDefault();
});

// The resume stream (server-sent events, read with fetch so that every event type arrives
// the same way): text deltas are shown as they come, the last event's type is the state,
// and the page reloads once the response has ended (its terminal event, or the stream's
// end), to show it as stored.
const TERMINAL = ["response.completed", "response.incomplete", "response.failed", "response.cancelled"];

async function follow(live) {
  const state = live.querySelector("#live-state");
  const text = live.querySelector("#live-text");
  const answer = await fetch(live.dataset.events, { credentials: "same-origin" });
  if (!answer.ok) {
    state.textContent = `the events could not be read (${answer.status})`;
    return;
  }
  const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    const frames = buffered.split("\n\n");
    buffered = frames.pop();
    for (const frame of frames) {
      const data = frame.split("\n").find((line) => line.startsWith("data: "));
      if (!data) continue; // a keep-alive comment
      const event = JSON.parse(data.slice(6));
      state.textContent = event.type;
      if (event.type === "response.output_text.delta") text.textContent += event.delta;
      if (TERMINAL.includes(event.type)) {
        reader.cancel();
        buffered = null;
        break;
      }
    }
    if (buffered === null) break;
  }
  state.textContent += " · reloading";
  window.location.reload();
}

const live = document.getElementById("live");
if (live) follow(live);
