// The dashboard's Server-Sent Events parser (crates/api/ui/js/sse.js), fed the way a network feeds
// it: in pieces cut anywhere, with every kind of line end.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

const source = readFileSync(new URL('../../crates/api/ui/js/sse.js', import.meta.url), 'utf8');
const { SseParser } = await import(`data:text/javascript,${encodeURIComponent(source)}`);

function parse(pieces) {
  const events = [];
  const comments = [];
  const parser = new SseParser((e) => events.push(e), (c) => comments.push(c));
  const encoder = new TextEncoder();
  for (const piece of pieces) parser.push(typeof piece === 'string' ? encoder.encode(piece) : piece);
  return { events, comments, parser };
}

const STREAM = 'id: 7\nevent: task.state\ndata: {"a":1}\n\n: keep-alive\n\r\nid: 8\r\nevent: worker.joined\r\ndata: line one\r\ndata:line two\r\n\r\nretry: 3000\rdata: no type\r\r';

test('frames, ids, comments and multi-line data', () => {
  const { events, comments, parser } = parse([STREAM]);
  assert.deepEqual(events, [
    { type: 'task.state', data: '{"a":1}', id: '7' },
    { type: 'worker.joined', data: 'line one\nline two', id: '8' },
    { type: 'message', data: 'no type', id: '8' },
  ]);
  assert.deepEqual(comments, ['keep-alive']);
  assert.equal(parser.lastEventId, '8');
  assert.equal(parser.retry, 3000);
});

test('the same stream cut at every byte gives the same events', () => {
  const bytes = new TextEncoder().encode(STREAM);
  const whole = parse([STREAM]).events;
  for (let cut = 1; cut < bytes.length; cut++) {
    const { events } = parse([bytes.slice(0, cut), bytes.slice(cut)]);
    assert.deepEqual(events, whole, `cut at ${cut}`);
  }
});

test('a multi-byte character split across chunks survives', () => {
  const bytes = new TextEncoder().encode('data: café ✓\n\n');
  const { events } = parse([bytes.slice(0, 10), bytes.slice(10, 13), bytes.slice(13)]);
  assert.equal(events[0].data, 'café ✓');
});

test('an event without data is not dispatched, and an unfinished one waits', () => {
  const { events } = parse(['event: x\n\n', 'data: half']);
  assert.deepEqual(events, []);
});
