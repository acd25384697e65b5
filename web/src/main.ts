// The iotpipe dashboard: sign-in, fleet view, device view and the health strip, all
// from the documented API with the user's key. Views are switched by the URL's hash
// (#/ and #/device/<id>) so that the back button and reloads work; the key itself is
// only ever in sessionStorage and the Authorization header.

import "uplot/dist/uPlot.min.css";
import "./style.css";
import { ApiError, Client, health, type Device, type DeviceLive, type Windows } from "./api";
import { Chart, drawDevice, drawFleet, type Mode } from "./charts";
import {
  RANGES,
  WINDOWS,
  ago,
  defaultWindow,
  formatNumber,
  formatTime,
  timeZones,
  windowFits,
  windowMs,
} from "./format";

const KEY_SLOT = "iotpipe.key";
const PREFS_SLOT = "iotpipe.prefs";
/** Live figures and tables. */
const POLL_MS = 2000;
/** Charts and health cost the server more than the live counters: less often. */
const CHART_EVERY_MS = 15_000;
const HEALTH_EVERY_MS = 5000;
/** Rows in the fleet table; each row costs one live call per poll. */
const MAX_ROWS = 200;
const HOUR = 3_600_000;

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => document.getElementById(id) as T;

interface Prefs {
  range: number;
  window: string;
  tz: string;
}

const zones = timeZones();
const prefs: Prefs = loadPrefs();
let client: Client | null = null;
let view: "signin" | "fleet" | "device" = "signin";
let deviceId = "";
/** Bumped on every navigation and sign-in/out: answers for an older view are dropped. */
let generation = 0;
/** Set when what the charts show changed (controls, navigation, metrics). */
let chartDue = true;
let lastChart = 0;
let lastHealth = 0;
let busy = false;
let again = false;

const fleetChart = new Chart($("fleet-chart"));
const deviceChart = new Chart($("device-chart"));

function loadPrefs(): Prefs {
  const fallback = { range: RANGES[0].ms, window: defaultWindow(RANGES[0].ms), tz: zones.local };
  try {
    const saved = JSON.parse(sessionStorage.getItem(PREFS_SLOT) ?? "null") as Partial<Prefs> | null;
    return { ...fallback, ...saved };
  } catch {
    return fallback;
  }
}

function savePrefs(): void {
  sessionStorage.setItem(PREFS_SLOT, JSON.stringify(prefs));
}

function option(value: string, label: string): HTMLOptionElement {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

function td(text: string, className = ""): HTMLTableCellElement {
  const c = document.createElement("td");
  c.textContent = text;
  if (className) c.className = className;
  return c;
}

function message(e: unknown): string {
  return e instanceof ApiError ? e.message : `Unexpected error: ${String(e)}`;
}

function setStatus(text: string): void {
  const s = $("status");
  s.textContent = text;
  s.hidden = text === "";
}

// ---- controls: range, window, time zone -------------------------------------------

function fillWindows(): void {
  const select = $<HTMLSelectElement>("window");
  select.replaceChildren(
    ...WINDOWS.map((w) => {
      const o = option(w.spec, w.spec);
      // Over the server's window limit for this range: shown, but not choosable.
      o.disabled = !windowFits(prefs.range, w.ms);
      return o;
    }),
  );
  if (!windowFits(prefs.range, windowMs(prefs.window))) prefs.window = defaultWindow(prefs.range);
  select.value = prefs.window;
}

function setupControls(): void {
  const range = $<HTMLSelectElement>("range");
  const win = $<HTMLSelectElement>("window");
  const tz = $<HTMLSelectElement>("tz");
  range.replaceChildren(...RANGES.map((r) => option(String(r.ms), r.label)));
  tz.replaceChildren(...zones.all.map((z) => option(z, z)));
  if (!RANGES.some((r) => r.ms === prefs.range)) prefs.range = RANGES[0].ms;
  if (!zones.all.includes(prefs.tz)) prefs.tz = "UTC";
  range.value = String(prefs.range);
  tz.value = prefs.tz;
  fillWindows();
  const changed = (): void => {
    savePrefs();
    redrawCharts();
  };
  range.addEventListener("change", () => {
    prefs.range = Number(range.value);
    prefs.window = defaultWindow(prefs.range);
    fillWindows();
    changed();
  });
  win.addEventListener("change", () => {
    prefs.window = win.value;
    changed();
  });
  tz.addEventListener("change", () => {
    prefs.tz = tz.value;
    changed();
  });
  $("metric").addEventListener("change", () => {
    syncMode();
    redrawCharts();
  });
  $("mode").addEventListener("change", redrawCharts);
}

/** The windows to ask for now: the chosen range, ending now. */
function chartWindows(): Windows {
  const to = Date.now();
  return { from: to - prefs.range, to, window: prefs.window, tz: prefs.tz };
}

function redrawCharts(): void {
  chartDue = true;
  void tick();
}

/**
 * Whether to draw a chart in this refresh: when asked to, or when it is old. Taken
 * before the request, so that a change made while it is under way asks again.
 */
function takeChartTurn(): boolean {
  if (!chartDue && Date.now() - lastChart < CHART_EVERY_MS) return false;
  chartDue = false;
  lastChart = Date.now();
  return true;
}

// ---- sign-in and views --------------------------------------------------------------

function show(which: typeof view): void {
  for (const id of ["signin", "fleet", "device"] as const) $(id).hidden = id !== which;
  $("controls").hidden = which === "signin";
  $("nav").hidden = which === "signin";
  view = which;
}

/** Forgets everything shown, so that the next user to sign in never sees it. */
function clearData(): void {
  for (const id of ["devices", "latest", "fleet-data", "device-data"]) {
    const t = $<HTMLTableElement>(id);
    t.tBodies[0].replaceChildren();
  }
  for (const id of ["sum-total", "sum-minute", "sum-active", "dev-total", "dev-minute", "dev-rejected", "dev-seen"]) {
    $(id).textContent = "–";
  }
  for (const id of ["device-name", "device-meta", "dev-error", "device-missing"]) $(id).textContent = "";
  $("dev-error").hidden = true;
  $("device-missing").hidden = true;
  $("device-body").hidden = false;
  $("devices-note").hidden = true;
  $<HTMLSelectElement>("metric").replaceChildren();
  for (const box of [$("fleet-chart"), $("device-chart")]) {
    for (const k of Object.keys(box.dataset)) delete box.dataset[k];
  }
  fleetChart.clear();
  deviceChart.clear();
}

function signOut(why = ""): void {
  sessionStorage.removeItem(KEY_SLOT);
  client = null;
  clearData();
  const err = $("signin-error");
  err.textContent = why;
  err.hidden = why === "";
  route();
}

async function signIn(ev: SubmitEvent): Promise<void> {
  ev.preventDefault();
  const input = $<HTMLInputElement>("key");
  const button = $<HTMLButtonElement>("signin-button");
  const err = $("signin-error");
  const fail = (text: string): void => {
    err.textContent = text;
    err.hidden = false;
  };
  const key = input.value.trim();
  if (!key.startsWith("ipk_")) {
    fail("That is not a user API key: an API key starts with ipk_.");
    return;
  }
  button.disabled = true;
  try {
    // Any call a user may make proves the key; the device list is the first one needed.
    await new Client(key).devices();
  } catch (e) {
    fail(message(e));
    return;
  } finally {
    button.disabled = false;
  }
  input.value = "";
  err.hidden = true;
  sessionStorage.setItem(KEY_SLOT, key);
  client = new Client(key);
  clearData();
  route();
}

function route(): void {
  generation += 1;
  chartDue = true;
  if (!client) {
    show("signin");
    $("key").focus();
    return;
  }
  const m = /^#\/device\/([^/]+)$/.exec(window.location.hash);
  if (m) {
    const id = decodeURIComponent(m[1]);
    if (id !== deviceId) {
      deviceId = id;
      clearData();
    }
    show("device");
  } else {
    show("fleet");
  }
  void tick();
}

// ---- polling --------------------------------------------------------------------------

async function tick(): Promise<void> {
  if (busy) {
    again = true;
    return;
  }
  busy = true;
  const gen = generation;
  try {
    const now = Date.now();
    const healthDone = now - lastHealth >= HEALTH_EVERY_MS ? refreshHealth() : Promise.resolve();
    if (client && view === "fleet") await refreshFleet(client, gen);
    if (client && view === "device") await refreshDevice(client, gen);
    await healthDone;
    if (gen === generation) setStatus("");
  } catch (e) {
    if (gen === generation) {
      if (e instanceof ApiError && e.status === 401) {
        signOut("Your API key is no longer accepted; sign in again.");
      } else {
        setStatus(message(e));
      }
    }
  } finally {
    busy = false;
  }
  if (again) {
    again = false;
    void tick();
  }
}

async function refreshHealth(): Promise<void> {
  lastHealth = Date.now();
  const strip = $("health");
  const chip = (cls: string, text: string, title = ""): HTMLLIElement => {
    const li = document.createElement("li");
    li.className = cls;
    li.textContent = text;
    li.title = title;
    return li;
  };
  try {
    const h = await health();
    strip.dataset.status = h.status;
    strip.replaceChildren(
      chip(`overall ${h.status}`, `server ${h.status}`),
      ...Object.entries(h.components).map(([name, c]) => {
        const li = chip(
          c.ok ? "ok" : "bad",
          `${name} ${c.ok ? `${c.latency_ms.toFixed(1)} ms` : "failing"}`,
          `${name}: ${c.backend}`,
        );
        li.dataset.component = name;
        return li;
      }),
    );
  } catch {
    strip.dataset.status = "unreachable";
    strip.replaceChildren(chip("overall down", "server unreachable"));
  }
}

/** A chart that could not be fetched is tried again at the next refresh. */
function retryChart(e: unknown): never {
  chartDue = true;
  throw e;
}

/** Runs `f` over `items`, `limit` at a time, keeping their order. */
async function mapLimit<T, R>(items: T[], limit: number, f: (t: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await f(items[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

async function refreshFleet(c: Client, gen: number): Promise<void> {
  const now = Date.now();
  const [devices, live, lastHour] = await Promise.all([
    c.devices(),
    c.userLive(),
    // Events per device over the last hour (by event time, with the 5 minutes ahead
    // that the server accepts). Windows are clipped to the range, so the sum of a
    // device's windows is its count in the range.
    c.grouped({ from: now - HOUR, to: now + 300_000, window: "1h", tz: "UTC" }, "device"),
  ]);
  const shown = [...devices].sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id)).slice(0, MAX_ROWS);
  // A device deleted meanwhile answers 404: its row just shows no figures.
  const lives = await mapLimit(shown, 6, (d) => c.deviceLive(d.id).catch((e) => {
    if (e instanceof ApiError && e.status === 404) return null;
    throw e;
  }));
  if (gen !== generation) return;

  $("sum-total").textContent = String(live.events_total);
  $("sum-minute").textContent = String(live.events_last_minute);
  $("sum-active").textContent = String(live.devices_active_5m);
  const hourly = new Map<string, number>();
  for (const b of lastHour) hourly.set(b.group, (hourly.get(b.group) ?? 0) + b.count);
  $<HTMLTableElement>("devices").tBodies[0].replaceChildren(
    ...shown.map((d, i) => deviceRow(d, lives[i], hourly.get(d.id) ?? 0)),
  );
  const note = $("devices-note");
  note.hidden = devices.length > 0 && devices.length <= MAX_ROWS;
  note.textContent =
    devices.length === 0
      ? "No devices yet. Create one with POST /v1/devices (see docs/api.md)."
      : `Showing ${MAX_ROWS} of ${devices.length} devices, by name.`;

  if (takeChartTurn()) {
    const w = chartWindows();
    const buckets = await c.grouped(w, "type").catch(retryChart);
    if (gen !== generation) return;
    drawFleet(fleetChart, $("fleet-chart"), $<HTMLTableElement>("fleet-data"), w, buckets);
  }
}

function deviceRow(d: Device, live: DeviceLive | null, hour: number): HTMLTableRowElement {
  const tr = document.createElement("tr");
  tr.dataset.deviceId = d.id;
  const name = document.createElement("td");
  const link = document.createElement("a");
  link.href = `#/device/${encodeURIComponent(d.id)}`;
  link.textContent = d.name;
  link.className = "device-link";
  name.append(link);
  const seen = td(ago(live?.last_seen ?? null, prefs.tz), "seen");
  if (live?.last_seen) seen.title = live.last_seen;
  const error = td(live?.last_error ?? "", "error-text");
  error.title = live?.last_error ?? "";
  tr.append(
    name,
    td(d.type, "type"),
    seen,
    td(live ? String(live.events_last_minute) : "–", "num minute"),
    td(String(hour), "num hour"),
    td(live ? String(live.rejected_total) : "–", "num rejected"),
    error,
  );
  return tr;
}

async function refreshDevice(c: Client, gen: number): Promise<void> {
  const id = deviceId;
  let answers;
  try {
    answers = await Promise.all([c.device(id), c.deviceLive(id), c.latest(id)]);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
    if (gen !== generation) return;
    // The same answer for another user's device as for none: nothing to show.
    clearData();
    $("device-name").textContent = "Device not found";
    const missing = $("device-missing");
    missing.textContent = e.message;
    missing.hidden = false;
    $("device-body").hidden = true;
    return;
  }
  const [device, live, latest] = answers;
  if (gen !== generation) return;

  $("device-name").textContent = device.name;
  $("device-meta").textContent = `type ${device.type} · id ${device.id} · created ${formatTime(Date.parse(device.created_at), prefs.tz)}`;
  $("dev-total").textContent = String(live.events_total);
  $("dev-minute").textContent = String(live.events_last_minute);
  $("dev-rejected").textContent = String(live.rejected_total);
  $("dev-seen").textContent = ago(live.last_seen, prefs.tz);
  const err = $("dev-error");
  err.textContent = live.last_error ? `Last refused event: ${live.last_error}` : "";
  err.hidden = !live.last_error;

  const names = Object.keys(latest.metrics).sort();
  $<HTMLTableElement>("latest").tBodies[0].replaceChildren(
    ...names.map((n) => {
      const v = latest.metrics[n];
      const tr = document.createElement("tr");
      tr.dataset.metric = n;
      tr.dataset.value = String(v.value);
      const pick = document.createElement("button");
      pick.type = "button";
      pick.className = "link";
      pick.textContent = n;
      pick.title = `Chart ${n}`;
      pick.addEventListener("click", () => {
        $<HTMLSelectElement>("metric").value = n;
        $<HTMLSelectElement>("mode").value = "avg";
        syncMode();
        redrawCharts();
      });
      const name = document.createElement("td");
      name.append(pick);
      tr.append(name, td(formatNumber(v.value), "num"), td(formatTime(v.ts_ms, prefs.tz)));
      return tr;
    }),
  );
  $("latest-empty").hidden = names.length > 0;
  if (updateMetrics(names)) chartDue = true;

  if (takeChartTurn()) {
    const metric = $<HTMLSelectElement>("metric").value;
    const mode = $<HTMLSelectElement>("mode").value as Mode;
    const w = chartWindows();
    const agg = await c.deviceAggregates(id, w, metric || undefined).catch(retryChart);
    if (gen !== generation) return;
    drawDevice(deviceChart, $("device-chart"), $<HTMLTableElement>("device-data"), w, agg.buckets, metric, mode);
  }
}

/**
 * Offers the device's metrics, and "all events" (count only). The list is rebuilt
 * only when the names change, so an open menu is not reset by a refresh. Returns
 * whether the choice changed.
 */
function updateMetrics(names: string[]): boolean {
  const select = $<HTMLSelectElement>("metric");
  const offered = [...select.options].map((o) => o.value);
  const wanted = [...names, ""];
  if (offered.join("\n") === wanted.join("\n")) return false;
  const before = select.value;
  select.replaceChildren(...names.map((n) => option(n, n)), option("", "all events (count)"));
  select.value = wanted.includes(before) && offered.length > 0 ? before : (names[0] ?? "");
  syncMode();
  return select.value !== before || offered.length === 0;
}

/** Without a metric there is nothing to average: only the count can be shown. */
function syncMode(): void {
  const mode = $<HTMLSelectElement>("mode");
  const none = $<HTMLSelectElement>("metric").value === "";
  mode.options[0].disabled = none;
  if (none) mode.value = "count";
}

// ---- start ------------------------------------------------------------------------

$<HTMLFormElement>("signin-form").addEventListener("submit", (ev) => void signIn(ev));
$("signout").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
setupControls();
const saved = sessionStorage.getItem(KEY_SLOT);
client = saved ? new Client(saved) : null;
route();
// A tab in the background does not poll; it catches up when shown again.
setInterval(() => {
  if (!document.hidden) void tick();
}, POLL_MS);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) void tick();
});
