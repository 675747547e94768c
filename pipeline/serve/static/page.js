// The page of `aesthetics serve`: everything it shows comes from this server's /api (no other origin).
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child);  // text goes in as text, never as HTML
  return node;
}

function showMessage(text, isError = true) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function label(column) {
  return column.replace(/^score_prompt_/, "").replace(/^quality_/, "").replace(/^score_/, "").replaceAll("_", " ");
}

function figure(row) {
  const img = el("img", { src: row.thumbnail, alt: row.caption || row.key, loading: "lazy" });
  const caption = el("figcaption", {}, el("span", { className: "score" }, fmt(row.aesthetic_score)), " ",
                     row.caption || "");
  const node = el("figure", { className: "thumb", title: row.reason || "",
                              dataset: { key: row.key, shard: row.shard, score: String(row.aesthetic_score) } },
                  img, caption);
  node.addEventListener("click", () => showRow(row.shard, row.key));
  return node;
}

async function showRow(shard, key) {
  try {
    const row = await api(`/api/row?${new URLSearchParams({ shard, key })}`);
    $("row-image").src = row.image;
    const table = $("row-table");
    table.replaceChildren();
    for (const [name, value] of Object.entries(row)) {
      if (name === "image" || name === "thumbnail") continue;
      table.append(el("tr", { dataset: { column: name } }, el("td", {}, name),
                      el("td", {}, value === null ? "" : String(value))));
    }
    $("row").hidden = false;
  } catch (error) {
    showMessage(error.message);
  }
}

function attributeBars(values) {
  const box = $("attributes");
  box.replaceChildren();
  const entries = Object.entries(values);
  const scale = Math.max(0.01, ...entries.map(([, v]) => Math.abs(v || 0)));
  for (const [column, value] of entries) {
    const share = Math.min(1, Math.abs(value || 0) / scale) * 50;
    const bar = el("div", { className: value < 0 ? "bar negative" : "bar" });
    bar.style.width = `${share}%`;  // CSSOM, which the page's content security policy allows
    bar.style.left = value < 0 ? `${50 - share}%` : "50%";
    box.append(el("div", { className: "attribute", dataset: { column, value: String(value) } },
                  el("span", {}, label(column)), el("div", { className: "track" }, el("div", { className: "zero" }), bar),
                  el("span", {}, fmt(value, 4))));
  }
}

function tableRows(table, values, digits) {
  table.replaceChildren();
  for (const [column, value] of Object.entries(values)) {
    table.append(el("tr", { dataset: { column, value: String(value) } }, el("td", {}, label(column)),
                    el("td", {}, fmt(value, digits))));
  }
}

async function upload(file) {
  if (!file) return;
  showMessage("");
  $("preview").src = URL.createObjectURL(file);
  try {
    const result = await api("/api/score?k=12", {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const score = $("score");
    score.textContent = fmt(result.aesthetic_score);
    score.dataset.score = String(result.aesthetic_score);
    tableRows($("heads"), result.scores, 4);
    attributeBars(result.prompts);
    tableRows($("quality"), result.quality, 3);
    $("result").hidden = false;
    $("neighbours-title").hidden = false;
    $("neighbours").replaceChildren(...result.neighbours.map(figure));
  } catch (error) {
    $("result").hidden = true;
    showMessage(`upload refused: ${error.message}`);
  }
}

async function search(event) {
  event.preventDefault();
  showMessage("");
  const params = new URLSearchParams({ q: $("query").value, k: $("k").value, diverse: $("diverse").checked });
  if ($("use-min-score").checked) params.set("min_score", $("min-score").value);
  const grid = $("grid");
  grid.dataset.state = "loading";
  try {
    const result = await api(`/api/search?${params}`);
    grid.replaceChildren(...result.rows.map(figure));
    $("search-info").textContent = `${result.info.selected} of ${result.info.rows_passing} rows` +
      (result.info.min_score === null ? "" : ` scoring ≥ ${result.info.min_score}`) +
      ` (${result.info.method}, ${fmt(result.info.seconds, 2)} s)`;
  } catch (error) {
    grid.replaceChildren();
    showMessage(error.message);
  } finally {
    grid.dataset.state = "done";
  }
}

async function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => upload(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files[0]);
  });
  const slider = $("min-score");
  const showSlider = () => { $("min-score-value").textContent = Number(slider.value).toFixed(2); };
  slider.addEventListener("input", () => { $("use-min-score").checked = true; showSlider(); });
  $("search").addEventListener("submit", search);
  $("close-row").addEventListener("click", () => { $("row").hidden = true; });
  try {
    const info = await api("/api/info");
    $("model").textContent = `${info.model} on ${info.device}, heads: ${info.heads.join(", ")}`;
    $("warning").hidden = !info.tiny_random;
    if (info.score_range) {
      slider.min = Math.floor(info.score_range[0] * 10) / 10;
      slider.max = Math.ceil(info.score_range[1] * 10) / 10;
      slider.value = slider.min;
    }
    showSlider();
    document.body.dataset.ready = "true";
  } catch (error) {
    showMessage(error.message);
  }
}

init();
