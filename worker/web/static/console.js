// The console's script: local times, a refresh every few seconds, actions without a reload.
// The page works without it: times in UTC, links for the next page, forms that post.
"use strict";

const dateTime = new Intl.DateTimeFormat(undefined, {
  month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
});
const fullDate = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "long" });
const clock = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const UNITS = [["day", 86400], ["hour", 3600], ["minute", 60], ["second", 1]];
// Rotations asked for from this page: credential id -> the version it showed.
const pending = new Map();

function fromNow(epoch) {
  const seconds = epoch - Date.now() / 1000;
  const [unit, size] = UNITS.find(([, size]) => Math.abs(seconds) >= size) || UNITS[3];
  return relative.format(Math.round(seconds / size), unit);
}

function showTimes(root) {
  for (const element of root.querySelectorAll("time[data-epoch]")) {
    const epoch = Number(element.dataset.epoch);
    const when = new Date(epoch * 1000);
    element.title = fullDate.format(when);
    if (element.dataset.style === "time") {
      element.textContent = clock.format(when);
    } else if (element.dataset.style === "relative") {
      element.textContent = fromNow(epoch);
    } else {
      const distance = document.createElement("small");
      distance.textContent = fromNow(epoch);
      element.replaceChildren(dateTime.format(when), distance);
    }
  }
}

function markPending(root) {
  for (const row of root.querySelectorAll("tr[data-id]")) {
    const asked = pending.get(row.dataset.id);
    if (asked === undefined) continue;
    if (row.dataset.version === asked) {
      row.classList.add("pending");
    } else {
      pending.delete(row.dataset.id);
      row.classList.add("changed");
    }
  }
}

function notify(text, ok) {
  const notice = document.createElement("p");
  notice.className = ok ? "notice" : "notice error";
  notice.textContent = text;
  document.getElementById("notices").replaceChildren(notice);
}

function busy() {
  // A confirmation being answered, or a field being typed in, is not redrawn under the reader.
  return document.querySelector("[data-live] details[open]") !== null || document.hidden;
}

async function refresh() {
  if (busy()) return;
  let response;
  try {
    response = await fetch(location.href, { headers: { Accept: "text/html" } });
  } catch {
    document.body.classList.add("stale");
    return;
  }
  if (!response.ok) {
    document.body.classList.add("stale");
    return;
  }
  const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
  if (busy()) return;
  for (const part of document.querySelectorAll("[data-live]")) {
    const replacement = fresh.getElementById(part.id);
    if (replacement) part.replaceWith(document.adoptNode(replacement));
  }
  document.body.classList.remove("stale");
  showTimes(document);
  markPending(document);
}

// What an action's answer says: the app's JSON, or the status of another answer (a login
// asked for again, a proxy's error page).
async function answerOf(response) {
  try {
    const answer = await response.json();
    return answer.message || answer.error;
  } catch {
    return `The server answered ${response.status} ${response.statusText}; reload the page.`;
  }
}

async function act(form) {
  const body = new FormData(form);
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const response = await fetch(form.action, {
      method: "POST",
      body,
      headers: { Accept: "application/json" },
    });
    notify(await answerOf(response), response.ok);
    if (response.ok && form.action.endsWith("/rotate")) {
      pending.set(body.get("id"), body.get("version"));
    }
  } catch {
    notify("The console could not reach the server. Try again.", false);
  }
  form.closest("details")?.removeAttribute("open");
  button.disabled = false;
  await refresh();
}

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.matches("form[data-async]")) return;
  event.preventDefault();
  act(form);
});

document.addEventListener("DOMContentLoaded", () => {
  showTimes(document);
  const every = document.querySelector("[data-refresh]")?.dataset.refresh;
  if (every) {
    document.body.classList.add("live");
    setInterval(refresh, Number(every) * 1000);
  }
});
