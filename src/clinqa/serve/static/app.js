// clinqa page: no framework, no CDN. Record text is only ever inserted with textContent.
"use strict";

(function () {
  const KEY_STORAGE = "clinqa.apiKey";
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };

  const state = { key: "", patient: "" };

  // ------------------------------------------------------------------ messages

  function showMessage(text) {
    const box = $("message");
    box.textContent = text;
    box.hidden = false;
  }

  function clearMessage() {
    const box = $("message");
    box.textContent = "";
    box.hidden = true;
  }

  const STATUS_NAMES = {
    400: "Bad request", 401: "Not authorised", 403: "Forbidden", 404: "Not found", 413: "Too large",
    422: "Invalid request", 500: "Server error", 503: "Unavailable", 504: "Timed out",
  };

  function describeError(status, body) {
    const name = STATUS_NAMES[status] || "Error";
    const msg = body && typeof body.message === "string" ? body.message : "the server gave no details";
    if (status === 401) return `${name} (401): ${msg}. Check the API key.`;
    if (status === 403) return `${name} (403): ${msg}.`;
    return `${name} (${status}): ${msg}.`;
  }

  // ------------------------------------------------------------------ API

  async function api(path, options) {
    const headers = { Accept: "application/json" };
    if (state.key) headers.Authorization = "Bearer " + state.key;
    if (options && options.json !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method: (options && options.method) || "GET",
        headers,
        body: options && options.json !== undefined ? JSON.stringify(options.json) : undefined,
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (err) {
      return { ok: false, status: 0, body: { message: "the server cannot be reached" } };
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    return { ok: response.ok, status: response.status, body };
  }

  // ------------------------------------------------------------------ key

  function setKey(key) {
    state.key = key.trim();
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    else sessionStorage.removeItem(KEY_STORAGE);
  }

  async function useKey(event) {
    if (event) event.preventDefault();
    clearMessage();
    setKey($("api-key").value);
    if (!state.key) {
      $("key-status").textContent = "No key set.";
      resetPatients("(enter a key first)");
      return;
    }
    $("key-status").textContent = "Key kept for this tab.";
    await loadPatients();
  }

  function forgetKey() {
    setKey("");
    $("api-key").value = "";
    $("key-status").textContent = "Key forgotten.";
    resetPatients("(enter a key first)");
    clearTimeline();
    clearAnswer();
    $("api-key").focus();
  }

  // ------------------------------------------------------------------ patients

  function resetPatients(placeholder) {
    const select = $("patient");
    select.replaceChildren(el("option", { value: "" }, placeholder));
    state.patient = "";
  }

  async function loadPatients() {
    $("patient-status").textContent = "Loading patients…";
    const r = await api("/api/patients");
    if (!r.ok) {
      resetPatients("(no patients)");
      $("patient-status").textContent = "";
      showMessage(describeError(r.status, r.body));
      return;
    }
    const patients = r.body.patients || [];
    const select = $("patient");
    if (!patients.length) {
      resetPatients("(none)");
      $("patient-status").textContent = "This key may not read any patient's record.";
      return;
    }
    select.replaceChildren(el("option", { value: "" }, "Choose a patient…"));
    for (const p of patients) {
      const label = [p.name || "(no name)", p.birth_date ? "born " + p.birth_date : "", p.id].filter(Boolean).join(" · ");
      select.appendChild(el("option", { value: p.id }, label));
    }
    $("patient-status").textContent = `${patients.length} patient${patients.length === 1 ? "" : "s"} this key may read.`;
  }

  async function choosePatient() {
    clearMessage();
    clearAnswer();
    state.patient = $("patient").value;
    if (!state.patient) { clearTimeline(); return; }
    await loadTimeline(state.patient);
  }

  // ------------------------------------------------------------------ timeline

  function clearTimeline() {
    $("timeline").replaceChildren();
    $("timeline-status").textContent = "";
  }

  async function loadTimeline(patientId) {
    $("timeline-status").textContent = "Loading the record…";
    const r = await api(`/api/patients/${encodeURIComponent(patientId)}/timeline`);
    if (patientId !== state.patient) return; // the user moved on
    if (!r.ok) {
      clearTimeline();
      showMessage(describeError(r.status, r.body));
      return;
    }
    const list = $("timeline");
    const items = r.body.resources.map((res) => {
      // the rendered line already starts with [Type/id] and the date
      return el("li", { id: "res-" + res.id, tabindex: "-1", "data-date": res.date || "" }, res.text);
    });
    list.replaceChildren(...items);
    $("timeline-status").textContent = `${items.length} resources.`;
  }

  function highlight(resourceId) {
    for (const old of document.querySelectorAll(".timeline li.highlight")) old.classList.remove("highlight");
    const item = document.getElementById("res-" + resourceId);
    if (!item) {
      $("timeline-status").textContent = "That resource is not in the timeline shown (this key may not read it).";
      return;
    }
    item.classList.add("highlight");
    item.scrollIntoView({ block: "center" });
    item.focus({ preventScroll: true });
  }

  function citationLink(res, label) {
    const a = el("a", { href: "#res-" + res.id, "data-resource": res.id }, label);
    a.addEventListener("click", () => highlight(res.id)); // the default jump still happens (:target)
    return a;
  }

  // ------------------------------------------------------------------ asking

  function clearAnswer() {
    $("answer").textContent = "No question asked yet.";
    $("citations").replaceChildren();
    $("citations-heading").hidden = true;
    $("invalid").hidden = true;
    $("invalid").textContent = "";
    $("unsupported").hidden = true;
    $("selected").replaceChildren();
    $("selection").hidden = true;
    $("timings").textContent = "";
  }

  async function ask(event) {
    if (event) event.preventDefault();
    clearMessage();
    const question = $("question").value.trim();
    if (!state.key) { showMessage("Enter an API key first."); $("api-key").focus(); return; }
    if (!state.patient) { showMessage("Choose a patient first."); $("patient").focus(); return; }
    if (!question) { showMessage("Type a question first."); $("question").focus(); return; }
    const button = $("ask");
    const result = $("result");
    button.disabled = true;
    result.setAttribute("aria-busy", "true");
    $("answer").textContent = "Asking…";
    $("citations").replaceChildren();
    $("citations-heading").hidden = true;
    $("invalid").hidden = true;
    $("unsupported").hidden = true;
    $("selection").hidden = true;
    $("timings").textContent = "";
    try {
      const r = await api(`/api/patients/${encodeURIComponent(state.patient)}/ask`, { method: "POST", json: { question } });
      if (!r.ok) {
        $("answer").textContent = "No answer.";
        showMessage(describeError(r.status, r.body));
        return;
      }
      renderAnswer(r.body);
    } finally {
      button.disabled = false;
      result.setAttribute("aria-busy", "false");
    }
  }

  const handleOf = (res) => (res.id.includes("/") ? res.id : `${res.type}/${res.id}`);

  // The answer text, with each bracketed citation of this patient's resources made a link into the timeline.
  function renderAnswerText(text, citations) {
    const byHandle = new Map(citations.map((c) => [handleOf(c), c]));
    const node = $("answer");
    node.replaceChildren();
    let last = 0;
    for (const m of text.matchAll(/\[([^\[\]]+)\]/g)) {
      node.append(text.slice(last, m.index));
      const cited = m[1].split(/[,;]\s*/).map((part) => byHandle.get(part.trim()));
      if (cited.length && cited.every(Boolean)) {
        node.append("[");
        cited.forEach((c, i) => {
          if (i) node.append(", ");
          node.append(citationLink(c, handleOf(c)));
        });
        node.append("]");
      } else {
        node.append(m[0]);
      }
      last = m.index + m[0].length;
    }
    node.append(text.slice(last));
  }

  function renderAnswer(body) {
    renderAnswerText(body.answer || "(empty answer)", body.citations);
    const cites = $("citations");
    body.citations.forEach((res, i) => {
      const li = el("li");
      li.appendChild(citationLink(res, `[${i + 1}] ${res.text}`));
      cites.appendChild(li);
    });
    $("citations-heading").hidden = body.citations.length === 0;
    if (body.invalid_citations.length) {
      const n = body.invalid_citations.length;
      $("invalid").textContent = `${n} cited id${n === 1 ? " is" : "s are"} not in this patient's record and ` +
        `${n === 1 ? "was" : "were"} removed from the answer: ${body.invalid_citations.join(", ")}`;
      $("invalid").hidden = false;
    }
    $("unsupported").hidden = body.supported !== false;
    const sel = $("selected");
    for (const s of body.selected) {
      const li = el("li");
      li.appendChild(citationLink(s, handleOf(s)));
      li.appendChild(document.createTextNode(` ${s.date || "undated"} · score ${s.score.toFixed(2)}`));
      sel.appendChild(li);
    }
    $("selection").hidden = body.selected.length === 0;
    const t = body.timings || {};
    $("timings").textContent = `${body.model} · ${body.tokens} tokens · ${(t.total_s || 0).toFixed(2)} s`;
  }

  function questionKeys(event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  }

  // ------------------------------------------------------------------ start

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", useKey);
    $("forget-key").addEventListener("click", forgetKey);
    $("patient").addEventListener("change", choosePatient);
    $("ask-form").addEventListener("submit", ask);
    $("question").addEventListener("keydown", questionKeys);
    window.addEventListener("hashchange", () => {
      if (location.hash.startsWith("#res-")) highlight(decodeURIComponent(location.hash.slice(5)));
    });
    const saved = sessionStorage.getItem(KEY_STORAGE);
    if (saved) {
      $("api-key").value = saved;
      state.key = saved;
      $("key-status").textContent = "Using the key kept for this tab.";
      loadPatients();
    }
  });
})();
