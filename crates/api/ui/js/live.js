// The one connection to GET /v1/events that every page listens to. It resumes after a drop
// with Last-Event-ID (so no event is lost within the host's retention window), backs off
// between tries, and says when it is down so that the app can show it and fall back.

import { request } from './api.js';
import { readSse } from './sse.js';

const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 15000;
/** The host sends a keep-alive comment every 15 s: silence this long means a dead connection. */
const SILENCE_MS = 45000;

export class LiveEvents {
  constructor() {
    this.listeners = new Set();
    this.statusListeners = new Set();
    this.lastEventId = null;
    this.status = 'connecting';
    this.reason = '';
    this.retryAt = 0;
    this.stopped = true;
    this.generation = 0;
  }

  /** `fn(event)` for every event: `{type: 'task.state', topic, kind, task_id, worker_id, data, ...}`;
   *  `{type: 'resync'}` when events may have been missed (pages reload their data then). */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** `fn(status, reason)`, status one of connecting, live, down. */
  onStatus(fn) {
    this.statusListeners.add(fn);
    fn(this.status, this.reason);
    return () => this.statusListeners.delete(fn);
  }

  get up() {
    return this.status === 'live';
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.lastEventId = null;
    // A loop of an earlier session still asleep sees a newer generation and ends.
    this.generation += 1;
    this.run(this.generation);
  }

  stop() {
    this.stopped = true;
    this.abort?.abort();
    this.setStatus('connecting');
  }

  setStatus(status, reason = '') {
    if (status === this.status && reason === this.reason) return;
    this.status = status;
    this.reason = reason;
    for (const fn of this.statusListeners) fn(status, reason);
  }

  emit(event) {
    for (const fn of this.listeners) {
      try {
        fn(event);
      } catch (error) {
        console.error('a live-update listener failed', error);
      }
    }
  }

  async run(generation) {
    const ended = () => this.stopped || generation !== this.generation;
    let delay = FIRST_RETRY_MS;
    let wasDown = false;
    while (!ended()) {
      const abort = new AbortController();
      this.abort = abort;
      let watchdog = null;
      const heard = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => abort.abort(), SILENCE_MS);
      };
      try {
        const headers = { Accept: 'text/event-stream' };
        if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId;
        const response = await request('GET', '/v1/events', { headers, raw: true, signal: abort.signal });
        heard();
        this.setStatus('live');
        // Without an id to resume from, what happened while we were away is lost: reload.
        if (wasDown && !this.lastEventId) this.emit({ type: 'resync' });
        delay = FIRST_RETRY_MS;
        wasDown = false;
        await readSse(response, (frame) => {
          heard();
          if (frame.id) this.lastEventId = frame.id;
          if (frame.type === 'reset') {
            this.emit({ type: 'resync' });
            return;
          }
          let event;
          try {
            event = JSON.parse(frame.data);
          } catch {
            return;
          }
          event.type = frame.type;
          event.received = performance.now();
          this.emit(event);
        }, heard);
        if (!ended()) throw new Error('the host closed the stream');
      } catch (error) {
        if (ended()) break;
        if (error.status === 401) break; // the app returns to the login screen
        const why = error.name === 'AbortError' ? 'no data for 45 s' : error.message;
        this.retryAt = Date.now() + delay;
        this.setStatus('down', why);
        wasDown = true;
      } finally {
        clearTimeout(watchdog);
      }
      if (ended()) break;
      await new Promise((resolve) => setTimeout(resolve, delay * (0.8 + Math.random() * 0.4)));
      delay = Math.min(MAX_RETRY_MS, delay * 2);
      if (!ended() && this.status !== 'down') this.setStatus('connecting');
    }
  }
}
