#!/usr/bin/env node
'use strict';
// A Stackduck worker in Node.js: runs a handler for every job it receives.
//
//   node worker.js --types email_send --concurrency 10
//
// The demo handler prints each job; a payload may steer it: {"sleep_ms": 200}
// makes the job take that long, {"fail": "why"} makes it throw (the job is then
// retried with backoff, or dead-lettered once its retries are used up), and
// {"fail": "why", "fail_attempts": 1} throws on the first attempt only.
// SIGINT/SIGTERM stop it gracefully: running jobs finish, their acks are sent,
// jobs not started yet are given back to the queue.
const { parseArgs } = require('node:util');

const { DEFAULT_ADDRESS, Worker, connect } = require('./stackduck');

const HELP = `usage: node worker.js [options]

options:
  --addr HOST:PORT        server (env STACKDUCK_ADDR, default ${DEFAULT_ADDRESS})
  --token TOKEN           bearer token (env STACKDUCK_TOKEN)
  --types A,B             job types to handle (default email_send)
  --concurrency N         handlers running at once (default 10)
  --prefetch N            un-acked jobs the server may push (default max(4 x concurrency, 32))
  --lease-seconds N       lease per delivery (default: the server's setting)
  --grace-ms N            on SIGINT/SIGTERM, how long running jobs may still take (default 30000)
  --json                  print one JSON line per handled job to stdout

The demo handler follows the payload: {"sleep_ms": N} takes N ms, {"fail": "why"}
throws (retry, then dead letter), {"fail": "why", "fail_attempts": 1} throws on
attempt 1 only.`;

function int(name, text) {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!Number.isInteger(value)) throw new Error(`--${name}: not an integer: ${text}`);
  return value;
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
});

function makeHandler(json) {
  return async function handle(job, { signal }) {
    const data = job.data;
    const steer = data !== null && typeof data === 'object' && !Array.isArray(data) ? data : {};
    if (steer.sleep_ms) await sleep(Number(steer.sleep_ms), signal);
    const failing = Boolean(steer.fail)
      && (steer.fail_attempts === undefined || job.attempt <= Number(steer.fail_attempts));
    if (json) {
      console.log(JSON.stringify({
        event: failing ? 'failed' : 'completed', id: job.id, type: job.job_type, attempt: job.attempt, payload: data,
      }));
    } else {
      console.log(`${failing ? 'failing' : 'done'}: ${job.job_type} ${job.id} (attempt ${job.attempt}) ${job.payload}`);
    }
    if (failing) throw new Error(String(steer.fail));
  };
}

async function main() {
  const { values } = parseArgs({
    options: {
      addr: { type: 'string' },
      token: { type: 'string' },
      types: { type: 'string', default: 'email_send' },
      concurrency: { type: 'string' },
      prefetch: { type: 'string' },
      'lease-seconds': { type: 'string' },
      'grace-ms': { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  const address = values.addr || process.env.STACKDUCK_ADDR || process.env.STACKDUCK_SERVER || DEFAULT_ADDRESS;
  const token = values.token || process.env.STACKDUCK_TOKEN || undefined;
  const types = values.types.split(',').map((t) => t.trim()).filter(Boolean);
  if (types.length === 0) throw new Error('--types: at least one job type');

  const client = connect(address, { token });
  const handle = makeHandler(values.json);
  const worker = new Worker(client, Object.fromEntries(types.map((t) => [t, handle])), {
    concurrency: int('concurrency', values.concurrency),
    prefetch: int('prefetch', values.prefetch),
    leaseSeconds: int('lease-seconds', values['lease-seconds']),
    gracePeriodMs: int('grace-ms', values['grace-ms']),
  });
  worker.stopOnSignals();
  console.error(`worker ${worker.workerId}: ${types.join(', ')} from ${address} `
    + `(concurrency ${worker.concurrency}, prefetch ${worker.prefetch})`);
  try {
    await worker.run();
  } finally {
    client.close();
    console.error(`worker stopped: ${JSON.stringify(worker.counters)}`);
  }
  return 0;
}

main().then(
  // Exit explicitly: a handler abandoned after the grace period may still hold the event loop.
  (code) => process.exit(code),
  (err) => {
    console.error(`worker: ${err.message}`);
    process.exit(1);
  },
);
