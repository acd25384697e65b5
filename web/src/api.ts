// The documented iotpipe HTTP API (docs/api.md), as the dashboard uses it. Every call
// carries the user's key in the Authorization header only: never in a URL, so that it
// cannot end up in server logs, history or a Referer.

export interface Device {
  id: string;
  name: string;
  type: string;
  created_at: string;
}

export interface DeviceLive {
  events_total: number;
  rejected_total: number;
  events_last_minute: number;
  last_seen: string | null;
  last_error: string | null;
}

export interface UserLive {
  events_total: number;
  events_last_minute: number;
  devices_active_5m: number;
}

export interface LatestValue {
  value: number;
  ts: string;
  ts_ms: number;
}

export interface DeviceLatest {
  device_id: string;
  metrics: Record<string, LatestValue>;
}

/** A device window; min/max/avg/sum are present only when a metric was asked for. */
export interface Bucket {
  start: string;
  start_ms: number;
  count: number;
  min?: number | null;
  max?: number | null;
  avg?: number | null;
  sum?: number | null;
}

export interface DeviceAggregates {
  device_id: string;
  window_ms: number;
  buckets: Bucket[];
}

export interface GroupBucket {
  start: string;
  start_ms: number;
  group: string;
  count: number;
}

export interface GroupedAggregates {
  window_ms: number;
  buckets: GroupBucket[];
  next_after_device?: string;
}

export interface Component {
  backend: string;
  ok: boolean;
  latency_ms: number;
}

export interface Health {
  status: "ok" | "degraded" | "down";
  components: Record<string, Component>;
}

/** The windows of an aggregate query, exactly as sent (the page shows them too). */
export interface Windows {
  from: number;
  to: number;
  window: string;
  tz: string;
}

/** A refused or failed call, with a message meant for a person. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

type Params = Record<string, string | number | undefined>;

function describe(status: number, body: unknown, retryAfter: string | null): string {
  const b = (body ?? {}) as { error?: string; field?: string; limit?: string };
  switch (status) {
    case 401:
      return "The server refused this API key. Check that you pasted the whole key (it starts with ipk_) and that it has not been rotated.";
    case 404:
      return "Not found: this device does not exist, or it is not yours.";
    case 429:
      if (b.limit === "login") {
        return `Too many failed sign-ins from this address. Try again in ${retryAfter ?? "a few"} s.`;
      }
      return `Rate limited; try again in ${retryAfter ?? "a few"} s.`;
    case 503:
      return "The server is unavailable right now (store unreachable or shutting down).";
  }
  if (b.field) return `${b.field}: ${b.error ?? "refused"}`;
  return b.error ?? `The server answered ${status}.`;
}

async function call<T>(path: string, key: string | null, params?: Params): Promise<T> {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params ?? {})) {
    if (v !== undefined) url.searchParams.set(k, String(v));
  }
  const headers: Record<string, string> = { Accept: "application/json" };
  if (key !== null) headers.Authorization = `Bearer ${key}`;
  let resp: Response;
  try {
    resp = await fetch(url, { headers, cache: "no-store", credentials: "omit" });
  } catch {
    throw new ApiError(0, "The server cannot be reached; retrying.");
  }
  const body: unknown = await resp.json().catch(() => null);
  // /health answers 503 with its usual body when the store is down: still a reading.
  if (!resp.ok && !(path === "/health" && body !== null)) {
    throw new ApiError(resp.status, describe(resp.status, body, resp.headers.get("Retry-After")));
  }
  return body as T;
}

/** `/health` needs no key. */
export function health(): Promise<Health> {
  return call<Health>("/health", null);
}

/** The calls made with one user's key. */
export class Client {
  constructor(private readonly key: string) {}

  async devices(): Promise<Device[]> {
    return (await call<{ devices: Device[] }>("/v1/devices", this.key)).devices;
  }

  device(id: string): Promise<Device> {
    return call<Device>(`/v1/devices/${encodeURIComponent(id)}`, this.key);
  }

  userLive(): Promise<UserLive> {
    return call<UserLive>("/v1/live", this.key);
  }

  deviceLive(id: string): Promise<DeviceLive> {
    return call<DeviceLive>(`/v1/devices/${encodeURIComponent(id)}/live`, this.key);
  }

  latest(id: string): Promise<DeviceLatest> {
    return call<DeviceLatest>(`/v1/devices/${encodeURIComponent(id)}/latest`, this.key);
  }

  deviceAggregates(id: string, w: Windows, metric?: string): Promise<DeviceAggregates> {
    return call<DeviceAggregates>(`/v1/devices/${encodeURIComponent(id)}/aggregates`, this.key, {
      ...w,
      metric,
    });
  }

  /**
   * Counts per window grouped by `type` or `device`. Grouping by device is paged by
   * the server past 1,000 devices, so every page is followed.
   */
  async grouped(w: Windows, groupBy: "type" | "device"): Promise<GroupBucket[]> {
    const out: GroupBucket[] = [];
    let after: string | undefined;
    for (;;) {
      const page = await call<GroupedAggregates>("/v1/aggregates", this.key, {
        ...w,
        group_by: groupBy,
        device_limit: groupBy === "device" ? 1000 : undefined,
        after_device: after,
      });
      out.push(...page.buckets);
      if (!page.next_after_device) return out;
      after = page.next_after_device;
    }
  }
}
