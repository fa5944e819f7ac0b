// The page: send each chosen photo to /api/predict, show its estimates, range, tile weights and warnings, and keep
// every result for the CSV. No framework and nothing from outside this machine.
"use strict";

const TARGETS = ["Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g"];
const LABELS = { Dry_Green_g: "Green", Dry_Dead_g: "Dead", Dry_Clover_g: "Clover", GDM_g: "GDM", Dry_Total_g: "Total" };
const AREA_KEY = "biomass5head.area_m2";
const shown = []; // every successful result, as the API gave it

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 1) => Number(x).toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: digits });

function area() {
  const a = parseFloat($("area").value);
  return a > 0 ? a : 0.21;
}

function kgHa(grams) {
  return (grams / area()) * 10; // 1 g/m² = 10 kg/ha
}

async function loadModel() {
  try {
    const m = await (await fetch("/api/model")).json();
    const oof = m.oof_weighted_r2 == null ? "not evaluated" : `OOF weighted R² ${m.oof_weighted_r2.toFixed(3)}`;
    const ood = typeof m.ood === "string" ? `photo check ${m.ood}` : `photo check against ${m.ood.training_photos} training photos`;
    $("model-info").textContent = `${m.backbone}, ${m.folds.length} fold model(s), ${m.img_size} px tiles in a ` +
      `${m.grid[0]}×${m.grid[1]} grid per view; trained ${m.trained.slice(0, 10)}; ${oof}; ${ood}.`;
  } catch (e) {
    $("model-info").textContent = "The model server does not answer.";
  }
}

function drawWeights(canvas, img, tw) {
  const w = img.naturalWidth, h = img.naturalHeight;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const [rows, cols] = tw.grid;
  const n = rows * cols;
  const half = Math.floor(w / 2);
  [["left", 0, half], ["right", half, w - half]].forEach(([view, x0, vw]) => {
    tw[view].forEach((weight, k) => {
      const r = Math.floor(k / cols), c = k % cols;
      const rel = weight * n; // 1 = an even share
      ctx.fillStyle = `rgba(255, 80, 0, ${Math.min(0.65, Math.max(0, 0.32 * rel))})`;
      ctx.fillRect(x0 + (c * vw) / cols, (r * h) / rows, vw / cols, h / rows);
      ctx.strokeStyle = "rgba(255,255,255,0.7)";
      ctx.lineWidth = Math.max(1, w / 400);
      ctx.strokeRect(x0 + (c * vw) / cols, (r * h) / rows, vw / cols, h / rows);
      ctx.fillStyle = "white";
      ctx.font = `${Math.max(12, Math.round(h / 18))}px system-ui`;
      ctx.fillText(`${Math.round(weight * 100)}%`, x0 + (c * vw) / cols + 6, (r * h) / rows + Math.max(14, h / 14));
    });
  });
}

function card(file, res) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.name = res.name;
  const title = document.createElement("h2");
  title.textContent = res.name;
  el.appendChild(title);
  if (res.error) {
    el.classList.add("error");
    el.dataset.status = res.status;
    el.appendChild(document.createTextNode(`${res.error} (HTTP ${res.status})`));
    return el;
  }
  const fig = document.createElement("div");
  fig.className = "figure";
  const img = document.createElement("img");
  img.alt = res.name;
  const canvas = document.createElement("canvas");
  img.onload = () => drawWeights(canvas, img, res.tile_weights);
  img.src = URL.createObjectURL(file);
  fig.append(img, canvas);
  el.appendChild(fig);

  const side = document.createElement("div");
  const table = document.createElement("table");
  table.innerHTML = "<thead><tr><th>Target</th><th>g / quadrat</th><th>kg DM / ha</th><th>range (g)</th></tr></thead>";
  const body = document.createElement("tbody");
  TARGETS.forEach((t) => {
    const tr = document.createElement("tr");
    tr.dataset.target = t;
    const [lo, hi] = res.range[t];
    tr.innerHTML = `<td>${LABELS[t]}</td><td class="grams" data-value="${res.grams[t]}">${fmt(res.grams[t], 2)}</td>` +
      `<td class="kgha" data-grams="${res.grams[t]}">${fmt(kgHa(res.grams[t]), 0)}</td>` +
      `<td class="range" data-lo="${lo}" data-hi="${hi}">${fmt(lo, 1)} – ${fmt(hi, 1)}</td>`;
    body.appendChild(tr);
  });
  table.appendChild(body);
  side.appendChild(table);

  const g = res.grams, total = Math.max(g.Dry_Total_g, g.Dry_Green_g + g.Dry_Dead_g + g.Dry_Clover_g, 1e-9);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.title = "Green, Dead and Clover stacked; the black line is Total";
  [["Dry_Green_g", "--green"], ["Dry_Dead_g", "--dead"], ["Dry_Clover_g", "--clover"]].forEach(([t, color]) => {
    const s = document.createElement("span");
    s.style.width = `${(100 * g[t]) / total}%`;
    s.style.background = `var(${color})`;
    bar.appendChild(s);
  });
  const mark = document.createElement("i");
  mark.className = "total";
  mark.style.left = `calc(${(100 * g.Dry_Total_g) / total}% - 1px)`;
  bar.appendChild(mark);
  side.appendChild(bar);
  const legend = document.createElement("div");
  legend.className = "legend muted";
  legend.innerHTML = '<span style="background:var(--green)"></span>Green<span style="background:var(--dead)"></span>Dead' +
    '<span style="background:var(--clover)"></span>Clover<span style="background:#111;width:2px"></span>Total';
  side.appendChild(legend);
  if (res.ood && res.ood.flag) {
    const w = document.createElement("p");
    w.className = "warning ood";
    w.textContent = `This photo looks unlike the training photos (distance ${res.ood.distance.toFixed(1)}, ` +
      `${res.ood.ratio == null ? "?" : res.ood.ratio.toFixed(1)}× the 99th percentile of the training photos' own): treat the estimate with care.`;
    side.appendChild(w);
  }
  if (res.note) {
    const n = document.createElement("p");
    n.className = "note";
    n.textContent = res.note;
    side.appendChild(n);
  }
  el.appendChild(side);
  return el;
}

async function handle(files) {
  files = Array.from(files);
  if (!files.length) return;
  const progress = $("progress");
  progress.hidden = false;
  progress.max = files.length;
  progress.value = 0;
  for (const [i, file] of files.entries()) {
    $("status").textContent = `Processing ${i + 1} of ${files.length}: ${file.name}…`;
    const form = new FormData();
    form.append("files", file, file.name);
    form.append("area_m2", String(area()));
    let res;
    try {
      const answer = await fetch("/api/predict", { method: "POST", body: form });
      const body = await answer.json();
      res = body.results && body.results.length ? body.results[0] : { name: file.name, error: body.detail, status: answer.status };
    } catch (e) {
      res = { name: file.name, error: `no answer from the server (${e})`, status: 0 };
    }
    if (!res.error) shown.push(res);
    $("results").prepend(card(file, res));
    progress.value = i + 1;
  }
  $("status").textContent = `Done: ${files.length} photo(s).`;
  $("status").dataset.done = String(Number($("status").dataset.done || 0) + files.length);
  progress.hidden = true;
  $("download").disabled = shown.length === 0;
}

function csv() {
  const head = ["image", "area_m2", ...TARGETS.flatMap((t) => [t, `${t.replace(/_g$/, "")}_kg_ha`, `${t}_min`, `${t}_max`]),
    "out_of_distribution", "ood_distance", "note"];
  const quote = (v) => {
    let s = String(v);
    if (typeof v === "string" && /^[=+\-@\t\r]/.test(s)) s = `'${s}`; // a spreadsheet must not run a file name
    return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  const rows = shown.map((r) => [r.name, area(), ...TARGETS.flatMap((t) => [r.grams[t], kgHa(r.grams[t]), ...r.range[t]]),
    r.ood ? r.ood.flag : "", r.ood ? r.ood.distance : "", r.note || ""].map(quote).join(","));
  return [head.join(","), ...rows].join("\n") + "\n";
}

function refreshKgHa() {
  document.querySelectorAll("td.kgha").forEach((td) => { td.textContent = fmt(kgHa(parseFloat(td.dataset.grams)), 0); });
}

window.addEventListener("DOMContentLoaded", () => {
  const saved = localStorage.getItem(AREA_KEY);
  if (saved && parseFloat(saved) > 0) $("area").value = saved;
  $("area").addEventListener("input", () => {
    if (area() > 0) localStorage.setItem(AREA_KEY, String(area()));
    refreshKgHa();
  });
  $("files").addEventListener("change", (e) => handle(e.target.files).then(() => { e.target.value = ""; }));
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => handle(e.dataTransfer.files));
  $("download").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([csv()], { type: "text/csv" }));
    a.download = "biomass_estimates.csv";
    a.click();
  });
  $("clear").addEventListener("click", () => { shown.length = 0; $("results").innerHTML = ""; $("download").disabled = true; });
  loadModel();
});
