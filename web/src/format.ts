// Numbers, instants and the range/window choices of the charts.

/** The server refuses a query spanning more windows than this (docs/api.md). */
export const MAX_WINDOWS = 10_000;

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

export const RANGES: { label: string; ms: number }[] = [
  { label: "1 h", ms: HOUR },
  { label: "6 h", ms: 6 * HOUR },
  { label: "24 h", ms: DAY },
  { label: "7 d", ms: 7 * DAY },
  { label: "30 d", ms: 30 * DAY },
];

// Every one divides a day, so each is valid with any `tz` (the server refuses a
// window such as 7h there).
export const WINDOWS: { spec: string; ms: number }[] = [
  { spec: "1m", ms: MINUTE },
  { spec: "5m", ms: 5 * MINUTE },
  { spec: "15m", ms: 15 * MINUTE },
  { spec: "30m", ms: 30 * MINUTE },
  { spec: "1h", ms: HOUR },
  { spec: "3h", ms: 3 * HOUR },
  { spec: "6h", ms: 6 * HOUR },
  { spec: "12h", ms: 12 * HOUR },
  { spec: "1d", ms: DAY },
];

/** Whether the server takes this window over this range: `ceil(range / window)`. */
export function windowFits(rangeMs: number, windowMs: number): boolean {
  return windowMs <= rangeMs && Math.ceil(rangeMs / windowMs) <= MAX_WINDOWS;
}

/** A window giving a readable number of points (about 50 to 200) for the range. */
export function defaultWindow(rangeMs: number): string {
  const fit = WINDOWS.find((w) => windowFits(rangeMs, w.ms) && rangeMs / w.ms <= 200);
  return (fit ?? WINDOWS[WINDOWS.length - 1]).spec;
}

export function windowMs(spec: string): number {
  return WINDOWS.find((w) => w.spec === spec)?.ms ?? HOUR;
}

/** The browser's zone, and every zone it knows, UTC first. */
export function timeZones(): { local: string; all: string[] } {
  const local = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const known = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : [];
  const all = ["UTC", ...new Set([local, ...known])].filter((z, i, a) => a.indexOf(z) === i);
  return { local, all };
}

const timeFormats = new Map<string, Intl.DateTimeFormat>();

/** `2026-11-21 10:00:00` in `tz`. */
export function formatTime(ms: number, tz: string): string {
  let f = timeFormats.get(tz);
  if (!f) {
    f = new Intl.DateTimeFormat("sv-SE", {
      timeZone: tz,
      year: "numeric",
      month: "2-digit",
      day: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
    });
    timeFormats.set(tz, f);
  }
  return f.format(new Date(ms));
}

/** At most six significant digits, without trailing zeros. */
export function formatNumber(v: number): string {
  return Number(v.toPrecision(6)).toString();
}

/** "12 s ago", "5 min ago", "3 h ago", else the instant in `tz`. */
export function ago(iso: string | null, tz: string, now = Date.now()): string {
  if (!iso) return "never";
  const ms = Date.parse(iso);
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86_400) return `${Math.floor(s / 3600)} h ago`;
  return formatTime(ms, tz);
}
