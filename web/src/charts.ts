// The two charts, drawn by uPlot, and the data tables under them. The tables hold the
// exact figures that were plotted (data-* attributes carry the numbers as the API sent
// them), so that what the chart shows can be read, copied, and checked by the tests.

import uPlot from "uplot";
import type { Bucket, GroupBucket, Windows } from "./api";
import { formatNumber, formatTime } from "./format";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

/** A uPlot chart that follows its box's width, over the whole range asked for. */
export class Chart {
  private plot: uPlot | null = null;
  private layout = "";
  /** The x range in seconds: the query's, not the data's, so that gaps show. */
  private xRange: uPlot.Range.MinMax = [null, null];

  constructor(private readonly box: HTMLElement) {
    new ResizeObserver(() => this.plot?.setSize(this.size())).observe(box);
  }

  private size(): { width: number; height: number } {
    const width = Math.max(this.box.clientWidth, 200);
    // Shorter on a phone, where the chart shares a small screen with the tables.
    return { width, height: width < 500 ? 220 : 300 };
  }

  /**
   * Draws `data`. The plot is rebuilt only when its series change (`layout`);
   * otherwise the data is swapped in, so a refresh does not flicker.
   */
  draw(layout: string, w: Windows, opts: Omit<uPlot.Options, "width" | "height">, data: uPlot.AlignedData): void {
    this.xRange = [w.from / 1000, w.to / 1000];
    if (this.plot && layout === this.layout) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    this.layout = layout;
    const x = { time: true, range: (): uPlot.Range.MinMax => this.xRange };
    this.plot = new uPlot({ ...opts, scales: { ...opts.scales, x }, ...this.size() }, data, this.box);
  }

  clear(): void {
    this.plot?.destroy();
    this.plot = null;
    this.layout = "";
  }
}

/** Whole steps for a count axis: no tick at half an event. */
const COUNT_STEPS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8].map((p) => m * p)).sort((a, b) => a - b);

/** Axis labels and the cursor's time, in the chosen zone. */
function timeOptions(tz: string, counts = false): Pick<uPlot.Options, "tzDate" | "axes"> {
  return {
    tzDate: (ts: number) => uPlot.tzDate(new Date(ts * 1000), tz),
    axes: [{ stroke: "#475569" }, { stroke: "#475569", size: 56, ...(counts ? { incrs: COUNT_STEPS } : {}) }],
  };
}

/** Counts start at zero, or a bar of 1 among bars of 2 would look empty. */
const COUNT_SCALES: uPlot.Scales = {
  y: { range: (_u, _min, max) => uPlot.rangeNum(0, Math.max(max, 1), 0.1, true) },
};

/** Marks the box with what it shows: the query, how many points, a render counter. */
function describeBox(box: HTMLElement, w: Windows, points: number, extra: Record<string, string>): void {
  box.dataset.from = String(w.from);
  box.dataset.to = String(w.to);
  box.dataset.window = w.window;
  box.dataset.tz = w.tz;
  box.dataset.points = String(points);
  for (const [k, v] of Object.entries(extra)) box.dataset[k] = v;
  box.dataset.renders = String(Number(box.dataset.renders ?? "0") + 1);
}

function cell(tag: "td" | "th", text: string): HTMLElement {
  const c = document.createElement(tag);
  c.textContent = text;
  return c;
}

function headRow(table: HTMLTableElement, labels: string[]): void {
  const tr = document.createElement("tr");
  tr.append(...labels.map((l) => cell("th", l)));
  table.tHead!.replaceChildren(tr);
}

/** Which figure a device chart shows. */
export type Mode = "avg" | "count";

/**
 * A device's windows: the average with a band from min to max, or the count of
 * events. Empty windows are not sent by the server, so they are gaps here.
 */
export function drawDevice(
  chart: Chart,
  box: HTMLElement,
  table: HTMLTableElement,
  w: Windows,
  buckets: Bucket[],
  metric: string,
  mode: Mode,
): void {
  const x = buckets.map((b) => b.start_ms / 1000);
  if (mode === "avg") {
    const avg = buckets.map((b) => b.avg ?? null);
    const min = buckets.map((b) => b.min ?? null);
    const max = buckets.map((b) => b.max ?? null);
    chart.draw(
      `avg:${metric}:${w.tz}`,
      w,
      {
        ...timeOptions(w.tz),
        series: [
          {},
          { label: `${metric} avg`, stroke: PALETTE[0], width: 2, points: { show: true, size: 5 } },
          { label: "min", stroke: "#93c5fd", width: 1 },
          { label: "max", stroke: "#93c5fd", width: 1 },
        ],
        // Shade between max (series 3) and min (series 2).
        bands: [{ series: [3, 2], fill: "rgba(37, 99, 235, 0.15)" }],
      },
      [x, avg, min, max],
    );
  } else {
    chart.draw(
      `count:${w.tz}`,
      w,
      {
        ...timeOptions(w.tz, true),
        scales: COUNT_SCALES,
        series: [
          {},
          {
            label: metric ? `events with ${metric}` : "events",
            stroke: PALETTE[0],
            fill: "rgba(37, 99, 235, 0.3)",
            paths: uPlot.paths.bars!({ size: [0.8, 40] }),
            points: { show: false },
          },
        ],
      },
      [x, buckets.map((b) => b.count)],
    );
  }
  describeBox(box, w, x.length, { metric, mode });

  headRow(table, mode === "avg" ? ["Window start", "Count", "Min", "Avg", "Max"] : ["Window start", "Count"]);
  const rows = buckets.map((b) => {
    const tr = document.createElement("tr");
    tr.dataset.startMs = String(b.start_ms);
    tr.dataset.count = String(b.count);
    tr.append(cell("td", formatTime(b.start_ms, w.tz)), cell("td", String(b.count)));
    if (mode === "avg") {
      for (const k of ["min", "avg", "max"] as const) {
        const v = b[k];
        tr.dataset[k] = v == null ? "" : String(v);
        tr.append(cell("td", v == null ? "–" : formatNumber(v)));
      }
    }
    return tr;
  });
  table.tBodies[0].replaceChildren(...rows);
}

/**
 * Events per window, one bar per event type. The server leaves out windows where a
 * type had no events; in a window where another type had some, that type's bar is 0.
 */
export function drawFleet(chart: Chart, box: HTMLElement, table: HTMLTableElement, w: Windows, buckets: GroupBucket[]): void {
  const starts = [...new Set(buckets.map((b) => b.start_ms))].sort((a, b) => a - b);
  const groups = [...new Set(buckets.map((b) => b.group))].sort();
  const index = new Map(starts.map((s, i) => [s, i]));
  const counts = groups.map(() => starts.map(() => 0));
  for (const b of buckets) counts[groups.indexOf(b.group)][index.get(b.start_ms)!] = b.count;

  chart.draw(
    `fleet:${w.tz}:${groups.join(",")}`,
    w,
    {
      ...timeOptions(w.tz, true),
      scales: COUNT_SCALES,
      series: [
        {},
        // Bars, not lines: a window without events is simply no bar, where a line
        // would be drawn across it as if it had some. Translucent, so that the bars
        // of several types in one window all stay visible.
        ...groups.map((g, i) => ({
          label: g,
          stroke: PALETTE[i % PALETTE.length],
          fill: `${PALETTE[i % PALETTE.length]}55`,
          width: 1,
          paths: uPlot.paths.bars!({ size: [0.8, 40] }),
          points: { show: false },
        })),
      ],
    },
    [starts.map((s) => s / 1000), ...counts],
  );
  describeBox(box, w, starts.length, { groups: groups.join(",") });

  headRow(table, ["Window start", ...groups]);
  const rows = starts.map((s, i) => {
    const tr = document.createElement("tr");
    tr.dataset.startMs = String(s);
    tr.append(cell("td", formatTime(s, w.tz)), ...groups.map((_, g) => cell("td", String(counts[g][i]))));
    return tr;
  });
  table.tBodies[0].replaceChildren(...rows);
}
