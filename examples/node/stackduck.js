'use strict';
/**
 * A small Stackduck client for Node.js: producer calls and a worker loop.
 *
 * Built on the official gRPC packages (@grpc/grpc-js, @grpc/proto-loader); the
 * stubs are made at run time from ../../proto/stackduck.proto (relative to this
 * file), so there is no code generation step.
 *
 *   const { connect, Worker } = require('./stackduck');
 *   const client = connect('127.0.0.1:50051', { token: process.env.STACKDUCK_TOKEN });
 *   const { id } = await client.enqueue('email_send', { to: 'ada@example.com' }, { priority: 1 });
 *
 *   const worker = new Worker(client, { email_send: async (job) => send(job.data) });
 *   worker.stopOnSignals();   // SIGINT/SIGTERM: graceful stop
 *   await worker.run();
 *
 * Payloads are JSON text on the wire (the proto's `payload` is a string), encoded
 * exactly as the Python client does: an object, array, number, boolean or null
 * is JSON.stringify'd; a *string* is taken to be JSON text already and sent
 * unchanged (to send the JSON string "hi", pass '"hi"'); a Buffer is UTF-8 JSON
 * text; undefined sends no payload (the server stores {}). A delivered job has
 * both `payload` (the text) and `data` (JSON.parse of it).
 *
 * How the worker drives the ConsumeJobs stream (the same protocol as the Python
 * Worker in stackduck_trio/_worker.py):
 *
 * - Credit. The request's `prefetch` is the most un-acked jobs the server pushes
 *   on the stream; there is no separate credit message: every outcome the server
 *   records (AckJobs item, CompleteJob, FailJob) gives one credit back. The
 *   worker runs at most `concurrency` handlers; the other delivered jobs wait
 *   here in delivery order, and their leases are kept alive while they wait.
 * - Acks. Outcomes are sent in AckJobs batches with the delivery's `lease_id`
 *   (the fencing token): a batch leaves when it is full, after `ackFlushMs`, or at
 *   once when no handler is running. A handler that throws fails its job with
 *   "<Error name>: <message>" (retried with backoff, or dead-lettered).
 * - Leases. Every third of the lease, ExtendLease is called for each held job.
 * - Heartbeats. Messages without `job` are heartbeats. Silence longer than
 *   `idleTimeoutMs` means the server is gone: the stream is dropped and reopened
 *   with capped exponential backoff.
 * - Stopping (stop(), or SIGINT/SIGTERM with stopOnSignals()). Jobs not started
 *   yet, and jobs arriving meanwhile, are *released* (given back unstarted: they
 *   keep their place and use no attempt; from the first release on the server
 *   sends the stream no new job). Running handlers get `gracePeriodMs` to finish, their acks
 *   are flushed, and only then is the stream cancelled -- cancelling it first
 *   would make the server requeue the jobs still running here as lost leases.
 */

const crypto = require('node:crypto');
const os = require('node:os');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_PATH = path.resolve(__dirname, '..', '..', 'proto', 'stackduck.proto');
const DEFAULT_ADDRESS = '127.0.0.1:50051';
/** Largest batch the server takes in one EnqueueJobs / AckJobs call. */
const MAX_BATCH = 10000;

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
/** Errors that reconnecting cannot fix: they end Worker.run(). */
const FATAL_CODES = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNIMPLEMENTED,
]);

let cachedService = null;

function loadService(protoPath = PROTO_PATH) {
  if (protoPath === PROTO_PATH && cachedService) return cachedService;
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names exactly as in the proto (job_type, lease_id, ...)
    longs: Number, // int64 fields are Unix seconds / milliseconds: safe as numbers
    enums: String,
    defaults: true, // absent fields of answers read as their defaults ("", 0, false)
    oneofs: true,
  });
  const service = grpc.loadPackageDefinition(definition).stackduck.StackDuckService;
  if (protoPath === PROTO_PATH) cachedService = service;
  return service;
}

/** A failed call: `code` is the gRPC status number, `codeName` its name, `details` the message. */
class StackduckError extends Error {
  constructor(code, details, method) {
    const codeName = CODE_NAMES[code] || `CODE_${code}`;
    super(`${method ? `${method}: ` : ''}${codeName}: ${details}`);
    this.name = 'StackduckError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.method = method;
  }
}

// grpc-js decodes the percent-encoded grpc-message with decodeURI, which leaves the
// escapes of URI-reserved characters alone; purerpc (the server's HTTP/2 layer)
// escapes every one of them, so "payload: not JSON" would read "payload%3A not JSON".
const RESERVED_ESCAPE = /%(2[346BCF]|3[ABDF]|40)/gi;
function decodeDetails(details) {
  return String(details || '').replace(RESERVED_ESCAPE, (_, hex) => String.fromCharCode(parseInt(hex, 16)));
}

function toError(err, method) {
  if (err instanceof StackduckError) return err;
  if (err && typeof err.code === 'number') {
    return new StackduckError(err.code, decodeDetails(err.details || err.message), method);
  }
  return err;
}

/** The JSON text of a payload (see the module comment); "" means "no payload". */
function encodePayload(payload) {
  if (payload === undefined) return '';
  if (typeof payload === 'string') return payload;
  if (Buffer.isBuffer(payload) || payload instanceof Uint8Array) return Buffer.from(payload).toString('utf8');
  if (typeof payload === 'number' && !Number.isFinite(payload)) {
    throw new TypeError('payload: NaN and infinities are not JSON');
  }
  const text = JSON.stringify(payload);
  if (typeof text !== 'string') throw new TypeError(`payload: ${typeof payload} is not JSON-serialisable`);
  return text;
}

/** scheduled_at: a Date, Unix seconds, or RFC 3339 text with an offset; "" = now. */
function encodeTime(value) {
  if (value === undefined || value === null) return '';
  if (value instanceof Date) return value.toISOString();
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new TypeError('scheduledAt must be finite');
    return String(value);
  }
  return String(value);
}

/** An EnqueueJobRequest; omitted options stay unset, so the server's defaults apply. */
function jobRequest(jobType, payload, opts = {}) {
  const request = {
    job_type: jobType,
    payload: encodePayload(payload),
    scheduled_at: encodeTime(opts.scheduledAt),
    idempotency_key: opts.idempotencyKey || '',
  };
  // proto3 `optional` fields: set only when given, so an explicit 0 is honoured.
  if (opts.priority !== undefined && opts.priority !== null) request.priority = opts.priority; // 1 (high)..3; default 2
  if (opts.delay !== undefined && opts.delay !== null) request.delay = opts.delay; // retry backoff base, s; default 30
  if (opts.maxRetries !== undefined && opts.maxRetries !== null) request.max_retries = opts.maxRetries; // default 2
  return request;
}

/** A GrpcJob as a plain object (proto field names) with a lazy `data` (the parsed payload). */
function toJob(pbJob) {
  const job = { ...pbJob };
  let parsed;
  let done = false;
  Object.defineProperty(job, 'data', {
    enumerable: false,
    get() {
      if (!done) {
        parsed = job.payload ? JSON.parse(job.payload) : {};
        done = true;
      }
      return parsed;
    },
  });
  return job;
}

function toItem(item) {
  return { ...item, ok: item.code === 0, codeName: CODE_NAMES[item.code] || `CODE_${item.code}` };
}

function describeError(err) {
  if (err instanceof Error) return err.message ? `${err.name}: ${err.message}` : err.name;
  return String(err);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', done);
      resolve();
    }
    if (signal) signal.addEventListener('abort', done, { once: true });
  });
}

class Client {
  /**
   * @param {string} address HOST:PORT
   * @param {object} [opts]
   * @param {string} [opts.token] bearer token: sent as `authorization: Bearer <token>` on every call
   * @param {boolean|object} [opts.tls] true for TLS with the system roots, or
   *   { rootCerts: Buffer } for a private CA
   * @param {number} [opts.timeoutMs=10000] deadline of each unary call
   * @param {string} [opts.protoPath] another copy of stackduck.proto
   * @param {object} [opts.channelOptions] extra grpc-js channel options
   */
  constructor(address = DEFAULT_ADDRESS, opts = {}) {
    const Service = loadService(opts.protoPath);
    let credentials = grpc.credentials.createInsecure();
    if (opts.tls) {
      credentials = grpc.credentials.createSsl(opts.tls === true ? null : opts.tls.rootCerts || null);
    }
    this.address = address;
    this.timeoutMs = opts.timeoutMs ?? 10000;
    this.token = opts.token || null;
    this.stub = new Service(address, credentials, {
      // like the grpcio tests: never send 127.0.0.1 traffic through an http_proxy
      'grpc.enable_http_proxy': 0,
      // HTTP/2 pings while calls are open: a hung or partitioned server closes the
      // connection within ~25 s, so calls after it do not reuse a dead socket
      'grpc.keepalive_time_ms': 20000,
      'grpc.keepalive_timeout_ms': 5000,
      ...(opts.channelOptions || {}),
    });
  }

  /** Fresh metadata for one call (the bearer token, if any). */
  metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    return metadata;
  }

  /** One unary call with a deadline; rejects with a StackduckError. */
  call(method, request, { timeoutMs } = {}) {
    const deadline = new Date(Date.now() + (timeoutMs ?? this.timeoutMs));
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata(), { deadline }, (err, response) => {
        if (err) reject(toError(err, method));
        else resolve(response);
      });
    });
  }

  // -- producers ----------------------------------------------------------------------

  /**
   * Enqueue one job.
   * @param {string} jobType
   * @param {*} payload see the module comment (objects are JSON.stringify'd, strings are JSON text)
   * @param {object} [opts] priority (1..3, default 2), delay (retry backoff base in s,
   *   0..3600, default 30), maxRetries (0..100, default 2), scheduledAt (Date, Unix s or
   *   RFC 3339), idempotencyKey (1..200 printable ASCII: enqueueing the same key again
   *   creates nothing and answers the existing job with duplicate = true), timeoutMs
   * @returns {Promise<{id: string, status: string, duplicate: boolean}>}
   */
  async enqueue(jobType, payload, opts = {}) {
    const response = await this.call('EnqueueJob', jobRequest(jobType, payload, opts), opts);
    return { id: response.job_id, status: response.status, duplicate: response.duplicate };
  }

  /**
   * Enqueue many jobs, one EnqueueJobs call (and one commit) per 10,000.
   * @param {Array<{jobType: string, payload?: *, priority?: number, delay?: number,
   *   maxRetries?: number, scheduledAt?: *, idempotencyKey?: string}>} jobs
   * @returns {Promise<Array<{job_id, code, codeName, message, status, duplicate, ok}>>}
   *   one result per job, in order; a rejected job has ok = false (e.g. INVALID_ARGUMENT)
   */
  async enqueueMany(jobs, opts = {}) {
    const results = [];
    for (let start = 0; start < jobs.length; start += MAX_BATCH) {
      const batch = jobs.slice(start, start + MAX_BATCH).map((j) => jobRequest(j.jobType, j.payload, j));
      const response = await this.call('EnqueueJobs', { jobs: batch }, opts);
      results.push(...response.results.map(toItem));
    }
    return results;
  }

  /** A job by id (any status); rejects with NOT_FOUND. */
  async get(jobId) {
    return toJob((await this.call('GetJob', { job_id: jobId })).job);
  }

  /** Cancel a scheduled, queued or running job; answers the cancelled job. */
  async cancel(jobId) {
    return toJob((await this.call('CancelJob', { job_id: jobId })).job);
  }

  /** GetStatsResponse: types (per job type), workers, running, dead, backends, queue_route. */
  async stats() {
    return this.call('GetStats', {});
  }

  // -- workers ------------------------------------------------------------------------

  /** Report a delivered job done; `leaseId` is the delivery's fencing token. */
  async complete(jobId, leaseId) {
    await this.call('CompleteJob', { job_id: jobId, lease_id: leaseId || '' });
  }

  /** Report a delivered job failed; answers the new status (scheduled, queued or failed). */
  async fail(jobId, leaseId, errorMessage) {
    const response = await this.call('FailJob', {
      job_id: jobId,
      lease_id: leaseId || '',
      error_message: errorMessage,
    });
    return response.status;
  }

  /**
   * Complete, fail or release many deliveries in one call.
   * @param {Array<{jobId: string, leaseId: string, failed?: boolean, error?: string, release?: boolean}>} acks
   * @returns {Promise<Array>} one result per ack (a stale lease is FAILED_PRECONDITION for that item)
   */
  async ackMany(acks, opts = {}) {
    const request = {
      acks: acks.map((a) => ({
        job_id: a.jobId,
        lease_id: a.leaseId || '',
        failed: Boolean(a.failed),
        error_message: a.error || '',
        release: Boolean(a.release),
      })),
    };
    return (await this.call('AckJobs', request, opts)).results.map(toItem);
  }

  /** Push a delivery's lease expiry to now + seconds; answers the new expiry (Unix ms). */
  async extendLease(jobId, leaseId, seconds) {
    const request = { job_id: jobId, lease_id: leaseId || '' };
    if (seconds !== undefined && seconds !== null) request.lease_seconds = seconds;
    return (await this.call('ExtendLease', request)).lease_expires_at_ms;
  }

  /**
   * Open a ConsumeJobs stream (a grpc-js ClientReadableStream of JobMessage); most
   * users want Worker instead. At most `prefetch` delivered jobs are un-acked at once.
   */
  consume(jobTypes, { workerId = '', prefetch = 1, leaseSeconds } = {}) {
    const request = { worker_id: workerId, job_types: jobTypes, prefetch };
    if (leaseSeconds !== undefined && leaseSeconds !== null) request.lease_seconds = leaseSeconds;
    return this.stub.ConsumeJobs(request, this.metadata());
  }

  close() {
    this.stub.close();
  }
}

/** connect(address, {token, tls, timeoutMs}): a Client (the channel connects lazily). */
function connect(address = DEFAULT_ADDRESS, opts = {}) {
  return new Client(address, opts);
}

const defaultLogger = {
  info: (...args) => console.error('[stackduck]', ...args),
  warn: (...args) => console.error('[stackduck] warning:', ...args),
  error: (...args) => console.error('[stackduck] error:', ...args),
};

class Worker {
  /**
   * @param {Client} client
   * @param {Object<string, function(job, {signal: AbortSignal}): (Promise|void)>} handlers
   *   job type -> handler; returning (or resolving) completes the job, throwing fails it
   * @param {object} [opts]
   * @param {number} [opts.concurrency=10] handlers running at once (1..1000)
   * @param {number} [opts.prefetch] un-acked jobs the server may push (1..1000;
   *   default max(4 * concurrency, 32), at most 1000)
   * @param {number} [opts.leaseSeconds] lease per delivery (default: the server's setting)
   * @param {string} [opts.workerId] shown in job records (default host:pid:random)
   * @param {number} [opts.gracePeriodMs=30000] on stop, how long running handlers may take
   * @param {number} [opts.idleTimeoutMs=6000] stream silence after which the server is presumed dead
   * @param {number} [opts.ackBatchSize] most acks per AckJobs call (default: prefetch)
   * @param {number} [opts.ackFlushMs=5] longest wait for more acks before a batch leaves
   * @param {number} [opts.reconnectMinMs=100]
   * @param {number} [opts.reconnectMaxMs=5000]
   * @param {object} [opts.logger] {info, warn, error}
   */
  constructor(client, handlers, opts = {}) {
    if (!handlers || Object.keys(handlers).length === 0) throw new Error('a worker needs at least one handler');
    const concurrency = opts.concurrency ?? 10;
    if (!(concurrency >= 1 && concurrency <= 1000)) throw new RangeError('concurrency must be 1..1000');
    const prefetch = opts.prefetch ?? Math.min(Math.max(4 * concurrency, 32), 1000);
    if (!(prefetch >= 1 && prefetch <= 1000)) throw new RangeError('prefetch must be 1..1000');
    this.client = client;
    this.handlers = { ...handlers };
    this.concurrency = concurrency;
    this.prefetch = prefetch;
    this.leaseSeconds = opts.leaseSeconds ?? null;
    this.workerId = opts.workerId || `${os.hostname()}:${process.pid}:${crypto.randomBytes(3).toString('hex')}`;
    this.gracePeriodMs = opts.gracePeriodMs ?? 30000;
    this.idleTimeoutMs = opts.idleTimeoutMs ?? 6000;
    this.ackBatchSize = opts.ackBatchSize ?? prefetch;
    this.ackFlushMs = opts.ackFlushMs ?? 5;
    this.reconnectMinMs = opts.reconnectMinMs ?? 100;
    this.reconnectMaxMs = opts.reconnectMaxMs ?? 5000;
    this.log = opts.logger || defaultLogger;
    this.counters = {
      received: 0, processed: 0, failed: 0, released: 0, abandoned: 0, dropped: 0,
      acksSent: 0, acksRejected: 0, acksLost: 0, ackBatches: 0,
      leaseExtensions: 0, leasesLost: 0, reconnects: 0,
    };
    this._waiting = []; // delivered, not started (FIFO)
    this._running = new Set();
    this._pendingAcks = [];
    this._ackTimer = null;
    this._acking = Promise.resolve();
    this._stopping = false;
    this._stopController = new AbortController();
    this._started = false;
    this._idleWaiters = [];
    this._generation = 0; // stream number: jobs of a lost stream are not started
  }

  /** Graceful stop; run() resolves when done. Safe to call more than once. */
  stop() {
    if (this._stopping) return;
    this._stopping = true;
    // Not started yet: give them back unstarted, they keep their place in the queue.
    for (const entry of this._waiting.splice(0)) this._release(entry);
    this._stopController.abort();
  }

  /** SIGINT/SIGTERM stop the worker gracefully; a second signal exits at once. Returns an uninstaller. */
  stopOnSignals(signals = ['SIGINT', 'SIGTERM']) {
    const onSignal = (signal) => {
      if (this._stopping) {
        this.log.warn(`${signal} again: exiting now`);
        process.exit(130);
      }
      this.log.info(`${signal}: stopping (running jobs finish, acks are flushed)`);
      this.stop();
    };
    for (const s of signals) process.on(s, onSignal);
    return () => {
      for (const s of signals) process.off(s, onSignal);
    };
  }

  get running() {
    return this._running.size;
  }

  /** Consume and run jobs until stop(); rejects on an error reconnecting cannot fix. */
  async run() {
    if (this._started) throw new Error('a Worker can run only once');
    this._started = true;
    const jobTypes = Object.keys(this.handlers).sort();
    let delay = this.reconnectMinMs;
    let fatal = null;
    while (!this._stopping) {
      let gotMessages = false;
      try {
        gotMessages = await this._consumeOnce(jobTypes);
      } catch (err) {
        gotMessages = Boolean(err.gotMessages);
        if (FATAL_CODES.has(err.code)) {
          fatal = err;
          this.log.error(`worker stopping: ${err.message}`);
          this.stop();
          break;
        }
        this.log.warn(`job stream lost: ${err.message}; reconnecting in ${delay} ms`);
      }
      if (this._stopping) break;
      if (gotMessages) delay = this.reconnectMinMs; // that stream worked: start over
      this.counters.reconnects += 1;
      await sleep(delay * (0.5 + Math.random() / 2), this._stopController.signal);
      delay = Math.min(delay * 2, this.reconnectMaxMs);
    }
    await this._drain();
    await this._flushAcks(); // anything released while the stream was being closed
    if (fatal) throw fatal;
  }

  /** One stream, until it ends (resolves), fails (rejects) or the worker stops (drains, then resolves). */
  _consumeOnce(jobTypes) {
    const generation = ++this._generation;
    const call = this.client.consume(jobTypes, {
      workerId: this.workerId,
      prefetch: this.prefetch,
      leaseSeconds: this.leaseSeconds,
    });
    let messages = 0;
    return new Promise((resolve, reject) => {
      let settled = false;
      let idleTimer = null;
      const onStop = () => {
        // Keep the stream open until the outcomes are in, then cancel it.
        this._drain().finally(() => finish(null));
      };
      const finish = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(idleTimer);
        this._stopController.signal.removeEventListener('abort', onStop);
        call.removeAllListeners('data');
        call.on('error', () => {}); // the cancel below surfaces as a CANCELLED error
        call.cancel();
        // Jobs of this stream that did not start: the server requeues them with the stream.
        const keep = this._waiting.filter((e) => e.generation !== generation);
        for (const entry of this._waiting) {
          if (entry.generation === generation) {
            this.counters.dropped += 1;
            this._untrack(entry);
          }
        }
        this._waiting = keep;
        if (err) {
          err.gotMessages = messages > 0;
          reject(err);
        } else {
          resolve(messages > 0);
        }
      };
      const resetIdle = () => {
        clearTimeout(idleTimer);
        idleTimer = setTimeout(() => {
          const err = new StackduckError(
            grpc.status.UNAVAILABLE, `no message on the job stream for ${this.idleTimeoutMs} ms`, 'ConsumeJobs');
          finish(err);
        }, this.idleTimeoutMs);
      };
      resetIdle();
      call.on('data', (message) => {
        messages += 1;
        resetIdle();
        if (!message.job) return; // heartbeat
        this._onJob(toJob(message.job), generation);
      });
      call.on('error', (err) => finish(toError(err, 'ConsumeJobs')));
      call.on('end', () => {
        if (!settled) this.log.info('the server ended the job stream; reconnecting');
        finish(null);
      });
      if (this._stopping) onStop();
      else this._stopController.signal.addEventListener('abort', onStop, { once: true });
    });
  }

  _onJob(job, generation) {
    this.counters.received += 1;
    const entry = { job, generation, leaseTimer: null, leaseLost: false, abandoned: false, controller: null };
    this._track(entry);
    if (this._stopping) {
      this._release(entry); // sent before the server saw us wind down
      return;
    }
    this._waiting.push(entry);
    this._startWaiting();
  }

  _startWaiting() {
    while (this._running.size < this.concurrency && this._waiting.length > 0 && !this._stopping) {
      this._runJob(this._waiting.shift());
    }
  }

  async _runJob(entry) {
    const { job } = entry;
    this._running.add(entry);
    entry.controller = new AbortController();
    let error = null;
    const handler = this.handlers[job.job_type];
    try {
      if (!handler) throw new Error(`no handler for job type '${job.job_type}' on this worker`);
      await handler(job, { signal: entry.controller.signal });
    } catch (err) {
      error = describeError(err);
    }
    this._untrack(entry);
    this._running.delete(entry);
    if (entry.abandoned) {
      // Outlived the grace period: not acked, the server requeues it with the stream.
    } else if (error === null) {
      this.counters.processed += 1;
      this._putAck({ jobId: job.id, leaseId: job.lease_id });
    } else {
      this.counters.failed += 1;
      this.log.info(`job ${job.id} (${job.job_type}) failed: ${error}`);
      this._putAck({ jobId: job.id, leaseId: job.lease_id, failed: true, error });
    }
    if (this._running.size === 0) for (const wake of this._idleWaiters.splice(0)) wake();
    this._startWaiting();
  }

  _release(entry) {
    this.counters.released += 1;
    this._untrack(entry);
    this._putAck({ jobId: entry.job.id, leaseId: entry.job.lease_id, release: true });
  }

  // -- leases ---------------------------------------------------------------------------

  _leaseSeconds(job) {
    if (this.leaseSeconds) return this.leaseSeconds;
    if (job.lease_expires_at_ms) {
      return Math.max(1, Math.min(86400, Math.round((job.lease_expires_at_ms - Date.now()) / 1000)));
    }
    return 60;
  }

  /** Keep a held job's lease alive (waiting or running), every third of the lease. */
  _track(entry) {
    const seconds = this._leaseSeconds(entry.job);
    entry.leaseTimer = setInterval(() => this._extend(entry, seconds), Math.max(50, (seconds * 1000) / 3));
    entry.leaseTimer.unref();
  }

  _untrack(entry) {
    clearInterval(entry.leaseTimer);
    entry.leaseTimer = null;
  }

  async _extend(entry, seconds) {
    if (entry.leaseLost || entry.extending) return;
    entry.extending = true;
    try {
      await this.client.extendLease(entry.job.id, entry.job.lease_id, seconds);
      this.counters.leaseExtensions += 1;
    } catch (err) {
      if (err.code === grpc.status.FAILED_PRECONDITION || err.code === grpc.status.NOT_FOUND) {
        entry.leaseLost = true;
        this.counters.leasesLost += 1;
        this._untrack(entry);
        this.log.warn(`job ${entry.job.id} lost its lease (${err.message}); its ack will be refused`);
      } else {
        this.log.warn(`extending the lease of job ${entry.job.id} failed: ${err.message}; retrying`);
      }
    } finally {
      entry.extending = false;
    }
  }

  // -- acks -----------------------------------------------------------------------------

  _putAck(ack) {
    this._pendingAcks.push(ack);
    if (this._pendingAcks.length >= this.ackBatchSize || this._running.size === 0) {
      // full, or nothing else is running (no more acks to wait for): send now
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
      this._flushAcks();
    } else if (!this._ackTimer) {
      this._ackTimer = setTimeout(() => {
        this._ackTimer = null;
        this._flushAcks();
      }, this.ackFlushMs);
    }
  }

  /** Send every pending ack (batches go one after another); resolves when sent. */
  _flushAcks() {
    this._acking = this._acking.then(async () => {
      while (this._pendingAcks.length > 0) {
        const batch = this._pendingAcks.splice(0, this.ackBatchSize);
        try {
          await this._sendAcks(batch);
        } catch (err) { // a bug, not a transport error (_sendAcks handles those): keep the chain alive
          this.counters.acksLost += batch.length;
          this.log.error(`sending ${batch.length} acks failed: ${err && err.stack}`);
        }
      }
    });
    return this._acking;
  }

  async _sendAcks(batch) {
    const attempts = 3;
    for (let attempt = 1; attempt <= attempts; attempt += 1) {
      let results;
      try {
        results = await this.client.ackMany(batch);
      } catch (err) {
        if (attempt === attempts || FATAL_CODES.has(err.code)) {
          this.counters.acksLost += batch.length;
          this.log.warn(`dropping ${batch.length} acks after ${attempt} attempts (${err.message}); `
            + 'the server will redeliver those jobs');
          return;
        }
        await sleep(50 * 2 ** attempt);
        continue;
      }
      this.counters.ackBatches += 1;
      results.forEach((result, i) => {
        if (result.ok) {
          this.counters.acksSent += 1;
        } else {
          this.counters.acksRejected += 1;
          this.log.warn(`ack of job ${batch[i].jobId} rejected: ${result.codeName}: ${result.message}`);
        }
      });
      return;
    }
  }

  /** Wait for running handlers (up to the grace period, then abandon them) and flush the acks. */
  async _drain() {
    if (!this._drainPromise) {
      this._drainPromise = (async () => {
        if (this._running.size > 0) {
          const idle = new Promise((resolve) => this._idleWaiters.push(resolve));
          let timer;
          const timeout = new Promise((resolve) => { timer = setTimeout(resolve, this.gracePeriodMs); });
          await Promise.race([idle, timeout]);
          clearTimeout(timer);
          if (this._running.size > 0) {
            this.log.warn(`abandoning ${this._running.size} handlers still running after ${this.gracePeriodMs} ms`);
            for (const entry of this._running) {
              entry.abandoned = true;
              this.counters.abandoned += 1;
              entry.controller.abort();
            }
          }
        }
        clearTimeout(this._ackTimer);
        this._ackTimer = null;
        await this._flushAcks();
      })();
    }
    return this._drainPromise;
  }
}

module.exports = {
  Client,
  DEFAULT_ADDRESS,
  PROTO_PATH,
  StackduckError,
  Worker,
  connect,
  encodePayload,
  status: grpc.status,
};
