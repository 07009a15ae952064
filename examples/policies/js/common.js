// Shared by the JavaScript policies: resources, amounts and reasons as the Rust kit writes them
// (policies/kit), so a task's reason reads the same whichever language placed it.

/** The four resources, in the order of every 4-element array here. */
export const RESOURCES = ['cpu', 'memory', 'storage', 'gpu'];

/** An amount with at most two decimals and no trailing zeros: `2.5`, `4`, `0.13`. */
export function fmtAmount(x) {
  if (!Number.isFinite(x) || x < 0) return '?';
  // Amounts are multiples of 1/1024: rounding to hundredths in integers is exact enough.
  const hundredths = Math.floor(x * 100 + 0.5);
  const int = Math.floor(hundredths / 100);
  const frac = hundredths % 100;
  if (frac === 0) return `${int}`;
  if (frac % 10 === 0) return `${int}.${frac / 10}`;
  return `${int}.${String(frac).padStart(2, '0')}`;
}

/** `4 CPU`, `2.5 GB memory`, `1 GPU`. */
export function describe(r, amount) {
  const n = fmtAmount(amount);
  switch (RESOURCES[r]) {
    case 'cpu': return `${n} CPU`;
    case 'gpu': return `${n} GPU`;
    default: return `${n} GB ${RESOURCES[r]}`;
  }
}

/** `4 CPU`, `2.5 GB`, `1 GPU`. */
export function describeShort(r, amount) {
  const n = fmtAmount(amount);
  switch (RESOURCES[r]) {
    case 'cpu': return `${n} CPU`;
    case 'gpu': return `${n} GPU`;
    default: return `${n} GB`;
  }
}

/** "2 CPU, 4 GB memory": the non-zero parts of a request. */
export function describeRequest(req) {
  const parts = [];
  for (let r = 0; r < 4; r++) if (req[r] > 0) parts.push(describe(r, req[r]));
  return parts.length ? parts.join(', ') : 'nothing';
}
