#!/usr/bin/env node
'use strict';
// Enqueue jobs on a Stackduck server from Node.js.
//
//   node producer.js '{"to": "ada@example.com"}'                 one job per argument
//   node producer.js --count 100 --batch                          100 demo jobs, one EnqueueJobs call
//   printf '{"a":1}\n[2]\n' | node producer.js --stdin --json      one job per line of stdin
//
// Run `node producer.js --help` for every option.
const readline = require('node:readline');
const { parseArgs } = require('node:util');

const { DEFAULT_ADDRESS, connect } = require('./stackduck');

const HELP = `usage: node producer.js [options] [PAYLOAD_JSON ...]

Enqueues one job per PAYLOAD_JSON argument, per line of stdin (--stdin), or
--count demo jobs ({"n": i, "to": "user<i>@example.com"}).

options:
  --addr HOST:PORT        server (env STACKDUCK_ADDR, default ${DEFAULT_ADDRESS})
  --token TOKEN           bearer token (env STACKDUCK_TOKEN)
  --type JOB_TYPE         job type (default email_send)
  --count N               enqueue N demo jobs
  --stdin                 read payloads from stdin, one JSON document per line
  --priority P            1 (high) .. 3 (low); server default 2
  --delay S               retry backoff base in seconds (0..3600); server default 30
  --max-retries N         retries after failures (0..100); server default 2
  --scheduled-at T        not before T: Unix seconds or RFC 3339 with an offset
  --idempotency-key K     with one job only: enqueueing K again creates nothing
  --batch                 one EnqueueJobs call (one commit) for all jobs
  --parallel N            EnqueueJob calls in flight (default 1: jobs keep their
                          order; with N > 1 their order in the queue is not defined)
  --json                  print {"id", "status", "duplicate", "payload"} per job
                          (default: print the job ids)
exit status: 0 when every job was enqueued, 1 otherwise, 2 on bad usage.`;

function int(name, text) {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!Number.isInteger(value)) throw new Error(`--${name}: not an integer: ${text}`);
  return value;
}

async function readStdinLines() {
  const lines = [];
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of rl) if (line.trim()) lines.push(line);
  return lines;
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      addr: { type: 'string' },
      token: { type: 'string' },
      type: { type: 'string', default: 'email_send' },
      count: { type: 'string' },
      stdin: { type: 'boolean', default: false },
      priority: { type: 'string' },
      delay: { type: 'string' },
      'max-retries': { type: 'string' },
      'scheduled-at': { type: 'string' },
      'idempotency-key': { type: 'string' },
      batch: { type: 'boolean', default: false },
      parallel: { type: 'string', default: '1' },
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

  // Payloads as JS values; each is JSON.stringify'd by the client.
  let texts = positionals;
  if (values.stdin) texts = texts.concat(await readStdinLines());
  const payloads = texts.map((text, i) => {
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new Error(`payload ${i + 1} is not JSON: ${err.message}`);
    }
  });
  const count = int('count', values.count);
  for (let n = 0; n < (count || 0); n += 1) payloads.push({ n, to: `user${n}@example.com` });
  if (payloads.length === 0) throw new Error('nothing to enqueue: give payloads, --stdin or --count (see --help)');
  if (values['idempotency-key'] && payloads.length > 1) throw new Error('--idempotency-key needs exactly one job');

  const opts = {
    priority: int('priority', values.priority),
    delay: int('delay', values.delay),
    maxRetries: int('max-retries', values['max-retries']),
    scheduledAt: values['scheduled-at'],
    idempotencyKey: values['idempotency-key'],
  };
  // A string payload would be taken as JSON text (as in the Python client): re-encode it.
  const wire = (p) => (typeof p === 'string' ? JSON.stringify(p) : p);

  const client = connect(address, { token });
  let results;
  try {
    if (values.batch) {
      const items = await client.enqueueMany(payloads.map((p) => ({ jobType: values.type, payload: wire(p), ...opts })));
      results = items.map((r) => (r.ok
        ? { id: r.job_id, status: r.status, duplicate: r.duplicate }
        : { error: `${r.codeName}: ${r.message}` }));
    } else {
      // One EnqueueJob per job, --parallel in flight; results printed in input order.
      const parallel = int('parallel', values.parallel);
      if (!(parallel >= 1)) throw new Error('--parallel: at least 1');
      results = new Array(payloads.length);
      let next = 0;
      const lane = async () => {
        while (next < payloads.length) {
          const i = next++;
          try {
            results[i] = await client.enqueue(values.type, wire(payloads[i]), opts);
          } catch (err) {
            results[i] = { error: err.message };
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(parallel, payloads.length) }, lane));
    }
  } finally {
    client.close();
  }
  let failures = 0;
  results.forEach((result, i) => {
    if (result.error) {
      failures += 1;
      console.error(`job ${i + 1}: ${result.error}`);
      if (values.json) console.log(JSON.stringify({ error: result.error, payload: payloads[i] }));
    } else if (values.json) {
      console.log(JSON.stringify({ ...result, payload: payloads[i] }));
    } else {
      console.log(result.id);
    }
  });
  return failures ? 1 : 0;
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => {
    console.error(`producer: ${err.message}`);
    process.exitCode = 2;
  },
);
