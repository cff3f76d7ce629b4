// Types for the hangon browser client (client.js). Protocol: docs/protocol.md.

export interface Caller {
  phone?: string;
  user_id?: string;
  call_id: string;
  tenant?: string;
}

export interface ClientOptions {
  /** Tenant sent with hello. */
  tenant?: string;
  /**
   * Signed client token sent with hello (required when the gateway has authentication on),
   * or a function returning one, called before every hello; with a function, a
   * "token_expired" refusal fetches a fresh token and reconnects instead of stopping.
   */
  token?: string | (() => string | Promise<string>);
  /** Where resume_token and last_seq survive a page reload; default sessionStorage, null: none. */
  storage?: Storage | null;
  /** Prefix of the storage key (default "hangon"). */
  storageKey?: string;
  /** Upper bound of the first reconnect delay, ms (default 500). */
  initialDelay?: number;
  /** Cap on the reconnect delay, ms (default 30000). */
  maxDelay?: number;
  /** Ms between heartbeat pings (default 15000). */
  heartbeatInterval?: number;
  /** Ms to wait for any frame after a ping before the connection counts as dead (default 10000). */
  heartbeatTimeout?: number;
  /** For tests: the WebSocket constructor, timers and random source. */
  WebSocket?: typeof WebSocket;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
  random?: () => number;
}

export type Status = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface RestoredDetail {
  sessionId: string;
  resumed: boolean;
  stale: boolean;
  state: Record<string, unknown>;
  version: number;
  /** First message replayed when older ones were lost (replay "partial"); else null. */
  replayFrom: number | null;
  /** The store was unreachable: nothing here is authoritative, turns wait, and another
   * "restored" follows once the store answers. */
  degraded: boolean;
}

export interface MessageDetail {
  seq: number;
  data: unknown;
}

export interface StateDetail {
  state: Record<string, unknown>;
  version: number;
}

export interface ReconnectingDetail {
  /** Close code, or null when the connection dropped without one. */
  code: number | null;
  /** Ms until the next attempt. */
  delay: number;
  attempt: number;
}

export interface ClosedDetail {
  code: number | null;
  reason: string;
}

export interface HangonClientEventMap {
  restored: CustomEvent<RestoredDetail>;
  message: CustomEvent<MessageDetail>;
  state: CustomEvent<StateDetail>;
  reconnecting: CustomEvent<ReconnectingDetail>;
  status: CustomEvent<{ status: Status }>;
  closed: CustomEvent<ClosedDetail>;
}

export interface Turn {
  turnId?: string;
  text?: string;
  form?: Record<string, unknown>;
  context?: Record<string, unknown>;
}

export declare const DEFAULTS: Readonly<{
  initialDelay: number;
  maxDelay: number;
  heartbeatInterval: number;
  heartbeatTimeout: number;
  storageKey: string;
}>;

/** A random ID (crypto.randomUUID where the context is secure, else getRandomValues). */
export declare function randomId(): string;

/** Whether a connection closed with `code` (null: no close frame) is resumed. */
export declare function shouldReconnect(code: number | null | undefined): boolean;

/** Delay before reconnect attempt `attempt`: uniform in [0, min(maxDelay, initialDelay * 2^attempt)]. */
export declare function backoffDelay(
  attempt: number,
  options: { initialDelay: number; maxDelay: number; random?: () => number },
): number;

export declare class HangonClient extends EventTarget {
  constructor(url: string, caller: Caller, options?: ClientOptions);
  readonly status: Status;
  readonly sessionId: string | null;
  readonly resumeToken: string | null;
  readonly lastSeq: number;
  readonly state: Record<string, unknown>;
  readonly version: number;
  /** Connect, resuming what storage holds for this caller. */
  start(): void;
  /** Send a turn; resolves with the version its ack names, across reconnects. */
  turn(turn?: Turn): Promise<number>;
  /** End the session; the client then stops and forgets it. */
  bye(): void;
  /** Stop without ending the session; it stays resumable. */
  close(): void;
  addEventListener<K extends keyof HangonClientEventMap>(
    type: K,
    listener: (event: HangonClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
}
