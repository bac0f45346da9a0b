// Posts pre-generated remote-write requests (see `rwgate-loadgen`) at a
// constant arrival rate, the way a fleet of Prometheus servers does: the
// offered load does not slow down when the server does.
//
// Environment:
//   TARGET    remote-write URL (required), e.g. http://127.0.0.1:8935/api/v1/write
//   PAYLOADS  directory written by rwgate-loadgen (required)
//   RATE      requests per second (default 50); samples/s = RATE x series
//   DURATION  e.g. 20s (default 20s)
//   VUS       pre-allocated virtual users (default 32); MAX_VUS (default 4 x VUS)
//   MODE      "rate" (constant-arrival-rate, default) or "vus" (constant-vus,
//             no think time: used for the overload run)
//   P99_MS    threshold on p99 latency (default 100)
//   MAX_ERROR_RATE  threshold on failed requests (default 0.01)
//   PASSWORD  if set, sends `Authorization: Basic base64(<tenant>:<PASSWORD>)`
//   SUMMARY   path of a JSON summary to write (optional)
//
// The protocol's headers (Remote-Write 1.0 or 2.0) come from the manifest.
// Each response of 2xx counts its samples into `samples_accepted`: for 2.0,
// the count the gateway gives in `X-Prometheus-Remote-Write-Samples-Written`;
// a 2xx whose count differs from what was sent counts into `written_mismatch`.

import http from 'k6/http';
import encoding from 'k6/encoding';
import { Counter } from 'k6/metrics';

const DIR = __ENV.PAYLOADS;
const TARGET = __ENV.TARGET;
if (!DIR || !TARGET) {
  throw new Error('set PAYLOADS and TARGET');
}
const manifest = JSON.parse(open(`${DIR}/manifest.json`));
// Manifests written before the protocol was recorded are Remote-Write 1.0.
const protocolHeaders = manifest.headers || {
  'Content-Type': 'application/x-protobuf',
  'Content-Encoding': 'snappy',
  'X-Prometheus-Remote-Write-Version': '0.1.0',
};
const V2 = manifest.protocol === '2.0';
const requests = manifest.requests.map((r) => {
  const headers = Object.assign({}, protocolHeaders, { 'Cloud-Account-Id': r.tenant });
  if (__ENV.PASSWORD) {
    headers.Authorization = `Basic ${encoding.b64encode(`${r.tenant}:${__ENV.PASSWORD}`)}`;
  }
  return { body: open(`${DIR}/${r.file}`, 'b'), headers, samples: r.samples };
});

const samplesAccepted = new Counter('samples_accepted');
const shed = new Counter('responses_503');
const writtenMismatch = new Counter('written_mismatch');

const VUS = parseInt(__ENV.VUS || '32', 10);
const scenario =
  (__ENV.MODE || 'rate') === 'vus'
    ? { executor: 'constant-vus', vus: VUS, duration: __ENV.DURATION || '20s' }
    : {
        executor: 'constant-arrival-rate',
        rate: parseInt(__ENV.RATE || '50', 10),
        timeUnit: '1s',
        duration: __ENV.DURATION || '20s',
        preAllocatedVUs: VUS,
        maxVUs: parseInt(__ENV.MAX_VUS || `${4 * VUS}`, 10),
      };

export const options = {
  discardResponseBodies: true,
  scenarios: { write: scenario },
  thresholds: {
    http_req_failed: [`rate<${__ENV.MAX_ERROR_RATE || '0.01'}`],
    written_mismatch: ['count<1'],
    http_req_duration: [`p(99)<${__ENV.P99_MS || '100'}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
};

export default function () {
  const r = requests[(__ITER * 7 + __VU) % requests.length];
  const res = http.post(TARGET, r.body, { headers: r.headers });
  if (res.status >= 200 && res.status < 300) {
    if (V2) {
      const written = parseInt(res.headers['X-Prometheus-Remote-Write-Samples-Written'] || '0', 10);
      samplesAccepted.add(written);
      if (written !== r.samples) {
        writtenMismatch.add(1);
      }
    } else {
      samplesAccepted.add(r.samples);
    }
  } else if (res.status === 503) {
    shed.add(1);
  }
}

function num(m, key) {
  return m && m.values && m.values[key] !== undefined ? m.values[key] : 0;
}

export function handleSummary(data) {
  const m = data.metrics;
  const d = m.http_req_duration;
  const out = {
    requests: num(m.http_reqs, 'count'),
    failed_rate: num(m.http_req_failed, 'rate'),
    dropped_iterations: num(m.dropped_iterations, 'count'),
    samples_accepted: num(m.samples_accepted, 'count'),
    responses_503: num(m.responses_503, 'count'),
    written_mismatch: num(m.written_mismatch, 'count'),
    protocol: manifest.protocol || '1.0',
    p50_ms: num(d, 'med'),
    p90_ms: num(d, 'p(90)'),
    p99_ms: num(d, 'p(99)'),
    max_ms: num(d, 'max'),
    duration_s: data.state.testRunDurationMs / 1000,
    thresholds_ok: Object.values(m).every(
      (x) => !x.thresholds || Object.values(x.thresholds).every((t) => t.ok),
    ),
  };
  const line =
    `k6: ${out.requests} Remote-Write ${out.protocol} requests, ${(out.failed_rate * 100).toFixed(2)}% failed, ` +
    `${out.dropped_iterations} dropped, ${out.samples_accepted} samples accepted, ` +
    `p50 ${out.p50_ms.toFixed(2)} ms, p99 ${out.p99_ms.toFixed(2)} ms, ` +
    `thresholds ${out.thresholds_ok ? 'ok' : 'FAILED'}\n`;
  const files = { stdout: line };
  if (__ENV.SUMMARY) {
    files[__ENV.SUMMARY] = JSON.stringify(out);
  }
  return files;
}
