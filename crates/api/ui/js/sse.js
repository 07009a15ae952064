// Server-Sent Events over fetch(): EventSource cannot send an Authorization header. The parser
// follows the HTML standard's event-stream rules (CR, LF or CRLF line ends; `event`, `data`,
// `id`, `retry` fields; `:` comments; an event is dispatched at a blank line).

export class SseParser {
  constructor(onEvent, onComment = () => {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.decoder = new TextDecoder();
    this.buffer = '';
    this.afterCR = false;
    this.reset();
    this.lastEventId = '';
    this.retry = null;
  }

  reset() {
    this.type = '';
    this.data = [];
  }

  /** Feeds bytes (Uint8Array) or text. */
  push(chunk) {
    let text = typeof chunk === 'string' ? chunk : this.decoder.decode(chunk, { stream: true });
    // A CR that ended the previous piece was a line end; an LF opening this one is its other half.
    if (this.afterCR && text.startsWith('\n')) text = text.slice(1);
    if (text) this.afterCR = false;
    this.buffer += text;
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf('\r', start);
      const lf = this.buffer.indexOf('\n', start);
      const end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
      if (end === -1) break;
      let next = end + 1;
      if (this.buffer[end] === '\r') {
        if (next === this.buffer.length) this.afterCR = true;
        else if (this.buffer[next] === '\n') next += 1;
      }
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === '') {
      if (this.data.length > 0) {
        this.onEvent({ type: this.type || 'message', data: this.data.join('\n'), id: this.lastEventId });
      }
      this.reset();
      return;
    }
    if (line.startsWith(':')) {
      this.onComment(line.slice(1).trim());
      return;
    }
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.type = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.lastEventId = value;
    else if (field === 'retry' && /^\d+$/.test(value)) this.retry = Number(value);
  }
}

/** Reads an event-stream Response to its end; resolves with the parser (its lastEventId). */
export async function readSse(response, onEvent, onComment) {
  const parser = new SseParser(onEvent, onComment);
  const reader = response.body.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
  } finally {
    reader.releaseLock();
  }
  return parser;
}
