"""The shared queue tier on Redis 7 (:class:`RedisTier`, ``REDIS_URL``).

:class:`RedisTier` implements :class:`~stackduck_trio._tier.QueueTier` with
redis-py's asyncio client, called from trio through trio-asyncio
(``trio_asyncio.aio_as_trio``: one hop per operation; a script call costs
about 0.2 ms of client CPU on the benchmark machine, most of it redis-py's own). The
caller must run it inside ``trio_asyncio.open_loop()``; :func:`open_redis_tier`
opens that loop when none is running.

Key layout (everything under ``{prefix}:``, default prefix ``stackduck``)
    ``{prefix}:ready:{job_type}`` ZSET
        ready (queued, or promoted scheduled) jobs of one type; score = the
        placement score (priority, seq), ties broken by member (the job id),
        which is exactly MemoryTier's ``(score, id)`` order.
    ``{prefix}:scheduled`` ZSET
        scheduled jobs not yet due; score = due time (epoch seconds).
    ``{prefix}:claims`` ZSET
        claimed jobs; score = claim deadline (epoch seconds).
    ``{prefix}:job`` HASH
        job id -> the record as last pushed (:func:`job_to_json`).
    ``{prefix}:type`` HASH
        job id -> job type (which ready set an unclaimed job is in).
    ``{prefix}:score`` HASH
        job id -> ready score of a *scheduled* job (copied into its ready set
        when it comes due; Lua never computes a score).
    ``{prefix}:claim`` HASH
        job id -> JSON ``[token, owner, until]`` (``until`` as exact text).
    ``{prefix}:types`` SET
        job types that may have a ready set (for :meth:`RedisTier.counts`).
    ``{prefix}:paused`` SET
        paused job types.
    ``{prefix}:limits`` HASH
        job type -> JSON ``[interval, burst, max_running]`` of its limits
        (interval = 1/rate as exact text, or ``""`` without a rate; 0 =
        no concurrency limit).
    ``{prefix}:tat:{job_type}`` STRING
        the rate's GCRA state (theoretical arrival time, ``%.17g`` text).
    ``{prefix}:claimed:{job_type}`` SET
        ids of the type's claimed jobs (the running count of its limit).
    ``{prefix}:ready`` pub/sub channel (not a key)
        a job type after jobs of that type became ready (push, settle back,
        resume), ``""`` after the schedule changed.

A job id is in exactly one of the three sorted sets, or in none (then it has
no entry in any hash either): every script keeps the structures consistent
with each other, which is why each operation is *one* Lua script: Redis runs
a script without interleaving any other command, so no instance ever sees a
job half moved (e.g. popped from a ready set but not yet in ``claims``, which
a crash between two commands would turn into a lost job).

Numbers
    Scores, due times, deadlines and ``now`` are computed in Python
    (:func:`stackduck_core.placement`, the runtime's clock) and passed as
    ``repr(float)`` text, which round-trips exactly; Redis parses it with
    ``strtod`` and compares numerically (``ZRANGE ... BYSCORE``). Lua copies
    these values, it never computes one, and never reads Redis ``TIME``.
    The one exception is the rate limit's state: the claim script mirrors
    :func:`stackduck_core.gcra_allowance` and the TAT update of
    :func:`stackduck_core.gcra` operation for operation, on the same doubles
    (a test compares them bit for bit).

Failures
    The client is built with retries disabled (``Retry(NoBackoff(), 0)``):
    a silent retry of a non-idempotent script (claim) could take jobs twice.
    Each call runs under ``trio.fail_after(op_timeout)`` and the sockets time
    out after ``op_timeout`` too; every Redis error or timeout becomes
    :class:`~stackduck_trio._tier.TierUnavailable`. The connection pool
    replaces idle connections that a server restart closed before using them
    (this needs redis-py's "maintenance notifications" off: with them on, the
    pool skips that check), and redis-py reloads a script that the server
    forgot (``NOSCRIPT``) before running it. An operation that was in flight
    when the connection broke fails; the caller decides whether to retry.

Cluster
    Ready-set keys are built inside the scripts from the prefix, so the
    scripts do not declare every key they touch: Redis Cluster is not
    supported (a single primary, optionally with replicas/Sentinel, is).
"""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar, cast

import attrs
import trio
import trio_asyncio  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from stackduck_core import Job, RateLimit, Status, TypeLimit, gcra, placement
from stackduck_core._ordering import SEQ_BITS

from ._tier import HELD, Claim, Claims, Held, TierCounts, TierUnavailable

__all__ = ["RedisTier", "job_from_json", "job_to_json", "open_redis_tier"]

log = logging.getLogger("stackduck.tier.redis")

T = TypeVar("T")

#: How many due scheduled jobs one claim promotes at most.
PROMOTE_LIMIT: Final = 1000
#: wait_ready's reconnection backoff: first delay, cap.
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 2.0

# -- job records -------------------------------------------------------------------------

_FLOAT_FIELDS: Final = frozenset(
    field.name for field in attrs.fields(Job) if field.type in ("float", "float | None", float)
)


def job_to_json(job: Job) -> str:
    """The JSON text of a job record: every field, status as its string value.

    Floats are written with ``repr`` (exact round trip), ``None`` as ``null``;
    non-ASCII text is escaped so that any Python string (even a lone
    surrogate) survives the trip through Redis.
    """
    fields = attrs.asdict(job, recurse=False)
    del fields["base"]  # how the record was made, not part of it (never stored)
    fields["status"] = job.status.value
    return json.dumps(fields, separators=(",", ":"))


def job_from_json(text: str | bytes) -> Job:
    """Invert :func:`job_to_json`."""
    fields: dict[str, Any] = json.loads(text)
    fields["status"] = Status(fields["status"])
    for name in _FLOAT_FIELDS:
        value = fields.get(name)
        if value is not None:
            fields[name] = float(value)
    return Job(**fields)


def _num(value: float) -> str:
    """A float as text Redis parses back to the same double."""
    return repr(float(value))


def _safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparsable Redis URL>"


# -- Lua ---------------------------------------------------------------------------------

# Every script gets the same KEYS and ARGV[1] = prefix, ARGV[2] = channel.
_KEY_NAMES: Final = (
    "job", "type", "score", "scheduled", "claim", "claims", "types", "paused", "limits",
)  # fmt: skip

_PRELUDE: Final = """
local K_JOB, K_TYPE, K_SCORE, K_SCHED = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_CLAIM, K_CLAIMS, K_TYPES, K_PAUSED = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_LIMITS = KEYS[9]
local PREFIX, CHANNEL = ARGV[1], ARGV[2]

local function ready_key(job_type)
  return PREFIX .. ':ready:' .. job_type
end

local function claimed_key(job_type)
  return PREFIX .. ':claimed:' .. job_type
end

-- Remove a job from wherever it is (ready, scheduled or claimed).
local function unlink(id)
  local job_type = redis.call('HGET', K_TYPE, id)
  if job_type then
    redis.call('ZREM', ready_key(job_type), id)
    redis.call('SREM', claimed_key(job_type), id)
  end
  redis.call('ZREM', K_SCHED, id)
  redis.call('ZREM', K_CLAIMS, id)
  redis.call('HDEL', K_SCORE, id)
  redis.call('HDEL', K_CLAIM, id)
  redis.call('HDEL', K_TYPE, id)
  redis.call('HDEL', K_JOB, id)
end

-- Store a record and put it in its ready set ('r') or the schedule ('s').
local function place(id, job_type, kind, score, due, record, woken)
  redis.call('HSET', K_JOB, id, record)
  redis.call('HSET', K_TYPE, id, job_type)
  if kind == 'r' then
    redis.call('ZADD', ready_key(job_type), score, id)
    redis.call('SADD', K_TYPES, job_type)
    woken[job_type] = true
  else
    redis.call('ZADD', K_SCHED, due, id)
    redis.call('HSET', K_SCORE, id, score)
    woken[''] = true
  end
end

local function publish(woken)
  local names = {}
  for name in pairs(woken) do
    names[#names + 1] = name
  end
  table.sort(names)
  for _, name in ipairs(names) do
    redis.call('PUBLISH', CHANNEL, name)
  end
end

-- stackduck_core.gcra_allowance and its conformance test, step for step.
local ROUNDING = 2 ^ -50

local function conforms(tat, now, interval, burst, cost)
  local new_tat = math.max(tat, now) + cost * interval
  local allow_at = new_tat - burst * interval
  return allow_at <= now + math.max(math.abs(now), math.abs(new_tat)) * ROUNDING
end

local function gcra_allowance(tat, now, interval, burst)
  local level = (now - math.max(tat, now)) / interval
  local k = math.min(math.max(math.floor(level) + burst - 1, 0), burst)
  while k < burst and conforms(tat, now, interval, burst, k + 1) do
    k = k + 1
  end
  return k
end

local function claim_token(id)
  local info = redis.call('HGET', K_CLAIM, id)
  if not info then
    return nil
  end
  return cjson.decode(info)
end
"""

# ARGV[3..]: groups of (id, type, kind, score, due, record). Returns how many placed.
_PUSH: Final = """
local woken = {}
local added = 0
for i = 3, #ARGV, 6 do
  local id = ARGV[i]
  if redis.call('HEXISTS', K_CLAIM, id) == 0 then
    unlink(id)
    place(id, ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], woken)
    added = added + 1
  end
end
publish(woken)
return added
"""

# ARGV: 3 job_type, 4 limit, 5 now, 6 until, 7 claim info JSON, 8 promote limit.
# Returns {records taken (best first), limit that held jobs back ('' none), the
# rate's TAT after the claim ('' without a rate), its interval text, its burst}.
_CLAIM: Final = """
local due = redis.call('ZRANGE', K_SCHED, '-inf', ARGV[5], 'BYSCORE', 'LIMIT', 0, ARGV[8])
for _, id in ipairs(due) do
  local job_type = redis.call('HGET', K_TYPE, id)
  local score = redis.call('HGET', K_SCORE, id)
  redis.call('ZREM', K_SCHED, id)
  redis.call('HDEL', K_SCORE, id)
  redis.call('ZADD', ready_key(job_type), score, id)
  redis.call('SADD', K_TYPES, job_type)
end
local job_type = ARGV[3]
local limit = tonumber(ARGV[4])
if limit <= 0 or redis.call('SISMEMBER', K_PAUSED, job_type) == 1 then
  return {{}, '', '', '', 0}
end
local held, tat_text = '', ''
local rules = redis.call('HGET', K_LIMITS, job_type)
local interval, burst, tat, now
if rules then
  -- TypeLimit.decide, with the type's claims as its running count
  rules = cjson.decode(rules)
  local want = math.min(limit, redis.call('ZCARD', ready_key(job_type)))
  limit = want
  if rules[3] > 0 then
    local running = redis.call('SCARD', claimed_key(job_type))
    if running + limit > rules[3] then
      -- Ids whose claim ended without leaving the set (scripts of a version
      -- before the set existed, in a rolling upgrade): a few go per claim.
      for _, id in ipairs(redis.call('SRANDMEMBER', claimed_key(job_type), 16)) do
        if redis.call('HEXISTS', K_CLAIM, id) == 0 then
          redis.call('SREM', claimed_key(job_type), id)
          running = running - 1
        end
      end
    end
    local room = math.max(rules[3] - running, 0)
    if room < limit then
      limit, held = room, 'running'
    end
  end
  if rules[1] ~= '' then
    interval, burst, now = tonumber(rules[1]), rules[2], tonumber(ARGV[5])
    tat = tonumber(redis.call('GET', PREFIX .. ':tat:' .. job_type) or ARGV[5])
    local tokens = gcra_allowance(tat, now, interval, burst)
    if tokens < limit then
      limit, held = tokens, 'rate'
    end
  end
end
local popped = {}
if limit > 0 then
  popped = redis.call('ZPOPMIN', ready_key(job_type), limit)
end
local records = {}
for i = 1, #popped, 2 do
  local id = popped[i]
  redis.call('ZADD', K_CLAIMS, ARGV[6], id)
  redis.call('HSET', K_CLAIM, id, ARGV[7])
  redis.call('SADD', claimed_key(job_type), id)
  records[#records + 1] = redis.call('HGET', K_JOB, id)
end
if interval then
  -- gcra()'s new TAT for the jobs taken (none taken: unchanged)
  if #records > 0 then
    tat = math.max(tat, now) + #records * interval
    redis.call('SET', PREFIX .. ':tat:' .. job_type, string.format('%.17g', tat))
  end
  tat_text = string.format('%.17g', tat)
end
return {records, held, tat_text, rules and rules[1] or '', rules and rules[2] or 0}
"""

# ARGV[3..]: groups of (id, token, kind, type, score, due, record); kind 'x' removes.
# Returns 1/0 per item.
_SETTLE: Final = """
local woken = {}
local results = {}
for i = 3, #ARGV, 7 do
  local id = ARGV[i]
  local info = claim_token(id)
  if info and info[1] == ARGV[i + 1] then
    local job_type = redis.call('HGET', K_TYPE, id)
    local rules = job_type and redis.call('HGET', K_LIMITS, job_type)
    if rules and cjson.decode(rules)[3] > 0 then
      woken[job_type] = true  -- room for one more under its concurrency limit
    end
    unlink(id)
    if ARGV[i + 2] ~= 'x' then
      place(id, ARGV[i + 3], ARGV[i + 2], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], woken)
    end
    results[#results + 1] = 1
  else
    results[#results + 1] = 0
  end
end
publish(woken)
return results
"""

# ARGV: 3 until, then pairs of (id, token). Returns 1/0 per item.
_RENEW: Final = """
local results = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local info = claim_token(id)
  if info and info[1] == ARGV[i + 1] then
    redis.call('HSET', K_CLAIM, id, cjson.encode({info[1], info[2], ARGV[3]}))
    redis.call('ZADD', K_CLAIMS, ARGV[3], id)
    results[#results + 1] = 1
  else
    results[#results + 1] = 0
  end
end
return results
"""

# ARGV: 3 now, 4 limit. Returns triples (id, claim info, record), deadline order.
_EXPIRED: Final = """
local ids = redis.call('ZRANGE', K_CLAIMS, '-inf', ARGV[3], 'BYSCORE', 'LIMIT', 0, ARGV[4])
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', K_CLAIM, id)
  out[#out + 1] = redis.call('HGET', K_JOB, id)
end
return out
"""

# ARGV[3..]: ids. Returns the removed record, or false (nil), per id.
_REMOVE: Final = """
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local record = false
  if redis.call('HEXISTS', K_CLAIM, id) == 0 then
    record = redis.call('HGET', K_JOB, id)
    if record then
      unlink(id)
    end
  else
    record = '!'  -- claimed: held by an instance (never a record: those are JSON)
  end
  out[#out + 1] = record
end
return out
"""

# ARGV: 3 job_type, 4 limits JSON ('' removes them). The rate's state is kept only
# while the rate and burst stay the same (Limiter.set). Publishes the type (a looser
# limit may let jobs go now).
_SET_LIMIT: Final = """
local old = redis.call('HGET', K_LIMITS, ARGV[3])
local keep = false
if old and ARGV[4] ~= '' then
  old = cjson.decode(old)
  local new = cjson.decode(ARGV[4])
  keep = old[1] == new[1] and old[2] == new[2]
end
if ARGV[4] == '' then
  redis.call('HDEL', K_LIMITS, ARGV[3])
else
  redis.call('HSET', K_LIMITS, ARGV[3], ARGV[4])
end
if not keep then
  redis.call('DEL', PREFIX .. ':tat:' .. ARGV[3])
end
redis.call('PUBLISH', CHANNEL, ARGV[3])
return 1
"""

# ARGV: 3 job_type, 4 '1' to pause / '0' to resume (resuming publishes the type).
_SET_PAUSED: Final = """
if ARGV[4] == '1' then
  redis.call('SADD', K_PAUSED, ARGV[3])
else
  redis.call('SREM', K_PAUSED, ARGV[3])
  redis.call('PUBLISH', CHANNEL, ARGV[3])
end
return 0
"""

# ARGV: 3, 4 the score bounds of priorities 2 and 3. Returns
# {scheduled, claimed, type, p1, p2, p3, type, ...}; forgets emptied types.
_COUNTS: Final = """
local out = {redis.call('ZCARD', K_SCHED), redis.call('ZCARD', K_CLAIMS)}
for _, job_type in ipairs(redis.call('SMEMBERS', K_TYPES)) do
  local key = ready_key(job_type)
  local p1 = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[3])
  local p2 = redis.call('ZCOUNT', key, ARGV[3], '(' .. ARGV[4])
  local p3 = redis.call('ZCOUNT', key, ARGV[4], '+inf')
  if p1 + p2 + p3 == 0 then
    redis.call('SREM', K_TYPES, job_type)
  else
    out[#out + 1] = job_type
    out[#out + 1] = p1
    out[#out + 1] = p2
    out[#out + 1] = p3
  end
end
return out
"""

_PRIORITY_2_FROM: Final = _num(float(1 << SEQ_BITS))
_PRIORITY_3_FROM: Final = _num(float(2 << SEQ_BITS))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _job_args(job: Job) -> list[str] | None:
    """``(type, kind, score, due, record)`` of a queued/scheduled job, else ``None``."""
    place = placement(job)
    if place is None:
        return None
    kind = "r" if place.ready else "s"
    return [job.job_type, kind, _num(place.score), _num(place.due), job_to_json(job)]


def _claim_from(token_info: str, record: str) -> Claim:
    token, owner, until = json.loads(token_info)
    return Claim(job_from_json(record), str(token), str(owner), float(until))


class RedisTier:
    """The queue tier on one Redis 7 primary (see the module docstring).

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).
        prefix: the namespace of every key and of the channel.
        op_timeout: seconds one operation may take before it raises
            :class:`TierUnavailable` (also the socket timeouts).
    """

    kind = "redis"
    holds_records = False
    #: wait_ready sends PING after this many idle seconds, to notice a dead link.
    keepalive: float = 10.0

    def __init__(self, url: str, *, prefix: str = "stackduck", op_timeout: float = 5.0) -> None:
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty")
        if not (op_timeout > 0 and math.isfinite(op_timeout)):
            raise ValueError(f"op_timeout must be a positive number of seconds, got {op_timeout}")
        self.url = url
        self.prefix = prefix
        self.op_timeout = op_timeout
        self.display_url = _safe_url(url)
        self.channel = f"{prefix}:ready"
        self._keys = [f"{prefix}:{name}" for name in _KEY_NAMES]
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}

    def __repr__(self) -> str:
        return f"RedisTier({self.display_url!r}, prefix={self.prefix!r})"

    # -- plumbing ------------------------------------------------------------------------

    def _unavailable(self, operation: str, detail: str) -> TierUnavailable:
        return TierUnavailable(f"Redis {operation} at {self.display_url} failed: {detail}")

    def _require_client(self, operation: str) -> Redis:
        if self._client is None:
            raise TierUnavailable(f"Redis {operation} at {self.display_url}: the tier is not open")
        return self._client

    async def _call(
        self, operation: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """Run one asyncio call under the operation timeout; errors become TierUnavailable."""
        try:
            with trio.fail_after(self.op_timeout):
                return cast(T, await trio_asyncio.aio_as_trio(fn)(*args, **kwargs))
        except trio.TooSlowError:
            raise self._unavailable(operation, f"no answer within {self.op_timeout:g} s") from None
        except (RedisError, OSError, EOFError) as exc:
            raise self._unavailable(operation, f"{type(exc).__name__}: {exc}") from exc

    async def _script(self, operation: str, args: Sequence[str]) -> Any:
        client = self._require_client(operation)
        script = self._scripts[operation]
        return await self._call(
            operation,
            script,
            keys=self._keys,
            args=[self.prefix, self.channel, *args],
            client=client,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client, check the server answers and load the scripts.

        Raises TierUnavailable (the client stays created, so the caller may
        call :meth:`open` again, and must call :meth:`close`).
        """
        if self._client is None:
            if trio_asyncio.current_loop.get() is None:
                raise RuntimeError("RedisTier needs a trio-asyncio loop: see open_redis_tier()")
            client: Redis = Redis.from_url(
                self.url,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
                # No socket timeout: every call already runs under trio's
                # fail_after(op_timeout), whose cancellation makes redis-py drop
                # the connection; redis-py's own read timeout would add an
                # asyncio timer per command (about 80 us of CPU each under
                # trio-asyncio, a quarter of a script call).
                socket_timeout=None,
                socket_connect_timeout=self.op_timeout,
                client_name=re.sub(r"\s", "_", f"stackduck-tier:{self.prefix}"),
                # With maintenance notifications (on by default with RESP3), the
                # pool stops checking idle connections for EOF, and every
                # connection a restart killed would fail one operation.
                maint_notifications_config=MaintNotificationsConfig(enabled=False),
            )
            self._client = client
            self._scripts = {
                name: client.register_script(_PRELUDE + body)
                for name, body in (
                    ("push", _PUSH),
                    ("claim", _CLAIM),
                    ("settle", _SETTLE),
                    ("renew", _RENEW),
                    ("expired", _EXPIRED),
                    ("remove", _REMOVE),
                    ("set_paused", _SET_PAUSED),
                    ("set_limit", _SET_LIMIT),
                    ("counts", _COUNTS),
                )
            }
        client = self._client
        for script in self._scripts.values():
            script.sha = await self._call("open", client.script_load, script.script)
        log.info("Redis queue tier at %s, prefix %s", self.display_url, self.prefix)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with trio.move_on_after(self.op_timeout) as scope:
            scope.shield = True
            try:
                await trio_asyncio.aio_as_trio(client.aclose)()
            except (RedisError, OSError) as exc:
                log.debug("closing the Redis client: %s", exc)

    async def clear(self) -> None:
        """Delete every key under the prefix (tests)."""
        client = self._require_client("clear")
        pattern = _glob_escape(self.prefix) + ":*"
        cursor = 0
        while True:
            cursor, keys = await self._call("clear", client.scan, cursor, match=pattern, count=1000)
            if keys:
                await self._call("clear", client.unlink, *keys)
            if cursor == 0:
                return

    # -- QueueTier -----------------------------------------------------------------------

    async def push(self, jobs: Sequence[Job]) -> int:
        """One script: per job, skip it if claimed, else unlink and place it, then publish."""
        args: list[str] = []
        for job in jobs:
            fields = _job_args(job)
            if fields is not None:
                args.append(job.id)
                args.extend(fields)
        if not args:
            return 0
        return int(await self._script("push", args))

    async def claim(
        self, job_type: str, limit: int, *, now: float, owner: str, token: str, until: float
    ) -> Claims:
        """One script: promote due jobs, pop the best ``limit``, record the claims.

        Popping and recording in one script is what makes a claim safe: no
        job is ever out of every set, and two claimers never get one job. If
        this call fails or is cancelled after the script ran, the jobs stay
        claimed by ``owner`` until ``until``; then :meth:`expired` finds them
        and they are put back (delayed, never lost or duplicated).
        """
        info = json.dumps([token, owner, _num(until)])
        args = [job_type, str(int(limit)), _num(now), _num(until), info, str(PROMOTE_LIMIT)]
        records, held, tat_text, interval_text, burst = await self._script("claim", args)
        claims = (Claim(job_from_json(record), token, owner, until) for record in records)
        retry_at: float | None = None
        if held == "rate":
            # when the next token comes, by the core's rule (the limit rebuilt
            # from the script's interval: a rounding of the rate cannot matter
            # here, a caller a hair early is told a new time)
            rate = RateLimit(1.0 / float(interval_text), int(burst))
            retry_at = now + gcra(float(tat_text), now, rate, 1).retry_after
        return Claims.limited(claims, held or None, retry_at)

    async def settle(self, items: Sequence[tuple[str, str, Job | None]]) -> list[bool]:
        """One script: check each token, then remove or re-place the job, then publish."""
        if not items:
            return []
        args: list[str] = []
        for job_id, token, record in items:
            fields = _job_args(record) if record is not None else None
            args += [job_id, token]
            if fields is None:
                args += ["x", "", "", "", ""]
            else:
                job_type, kind, score, due, text = fields
                args += [kind, job_type, score, due, text]
        results = await self._script("settle", args)
        return [bool(result) for result in results]

    async def renew(self, items: Sequence[tuple[str, str]], *, until: float) -> list[bool]:
        """One script: move the deadline of each claim whose token matches."""
        if not items:
            return []
        args = [_num(until)]
        for job_id, token in items:
            args += [job_id, token]
        results = await self._script("renew", args)
        return [bool(result) for result in results]

    async def expired(self, *, now: float, limit: int) -> list[Claim]:
        """One script, read only: a consistent snapshot of claims and records."""
        if limit <= 0:
            return []
        out = await self._script("expired", [_num(now), str(int(limit))])
        return [_claim_from(out[i + 1], out[i + 2]) for i in range(0, len(out), 3)]

    async def remove(self, job_ids: Sequence[str]) -> list[Job | Held | None]:
        """One script: take out each unclaimed job, returning its record (HELD if claimed)."""
        if not job_ids:
            return []
        out = await self._script("remove", list(job_ids))
        # Lua false arrives as nil (None), and as False were the script to use RESP3
        return [
            HELD if record == "!" else job_from_json(record) if isinstance(record, str) else None
            for record in out
        ]

    async def set_paused(self, job_type: str, paused: bool) -> None:
        """One script, so that a resume and its wake-up are one step."""
        await self._script("set_paused", [job_type, "1" if paused else "0"])

    async def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        """One script: store the limits (keeping the rate's state only for the same rate)."""
        text = ""
        if limit is not None:
            rate = limit.rate
            interval = "" if rate is None else _num(rate.emission_interval)
            burst = 0 if rate is None else rate.burst
            text = json.dumps([interval, burst, limit.max_running or 0])
        await self._script("set_limit", [job_type, text])

    async def limited_types(self) -> frozenset[str]:
        client = self._require_client("limits")
        names = await self._call("limits", client.hkeys, f"{self.prefix}:limits")
        return frozenset(str(name) for name in names)

    async def paused(self) -> frozenset[str]:
        client = self._require_client("paused")
        members = await self._call("paused", client.smembers, f"{self.prefix}:paused")
        return frozenset(str(member) for member in members)

    async def next_due(self) -> float | None:
        client = self._require_client("next_due")
        first = await self._call(
            "next_due", client.zrange, f"{self.prefix}:scheduled", 0, 0, withscores=True
        )
        return float(first[0][1]) if first else None

    async def counts(self) -> TierCounts:
        """One script: a consistent snapshot of all counts."""
        out = await self._script("counts", [_PRIORITY_2_FROM, _PRIORITY_3_FROM])
        ready: dict[str, tuple[int, int, int]] = {}
        for i in range(2, len(out), 4):
            ready[out[i]] = (int(out[i + 1]), int(out[i + 2]), int(out[i + 3]))
        return TierCounts(ready, int(out[0]), int(out[1]))

    async def wait_ready(self, on_ready: Callable[[str], None]) -> None:
        """Subscribe to the channel and call ``on_ready`` per message, until cancelled.

        After each (re)subscription is confirmed it calls ``on_ready("")``
        (anything published meanwhile was missed). A failed connection is
        retried after 0.05 s, doubling up to 2 s; it never raises.
        """
        delay = BACKOFF_MIN
        failing = False

        def subscribed() -> None:
            nonlocal delay, failing
            if failing:
                log.info("Redis pub/sub at %s: subscribed again", self.display_url)
            delay, failing = BACKOFF_MIN, False  # the next failure starts the backoff over
            on_ready("")

        while True:
            try:
                await self._listen(on_ready, subscribed)
            except (TierUnavailable, RedisError, OSError, EOFError) as exc:
                # warn once per outage, not at every attempt
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "Redis pub/sub at %s: %s; reconnecting in %.2f s",
                    self.display_url,
                    exc,
                    delay,
                )
                failing = True
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _listen(
        self, on_ready: Callable[[str], None], subscribed: Callable[[], None]
    ) -> None:
        """One pub/sub connection: subscribe, then relay messages until it fails."""
        client = self._require_client("subscribe")
        pubsub: PubSub = client.pubsub()
        try:
            await self._call("subscribe", pubsub.subscribe, self.channel)
            while True:
                message = await self._call("subscribe", pubsub.get_message, timeout=self.op_timeout)
                if message is None:
                    raise self._unavailable("subscribe", "no confirmation")
                if message["type"] == "subscribe":
                    break
            subscribed()
            pinged = False
            while True:
                wait = self.op_timeout if pinged else self.keepalive
                # parse_response, not get_message: with RESP3 and decoded
                # responses, redis-py 8.1 mangles the PONG into a message it drops,
                # and any answer at all is what proves the connection alive.
                with trio.fail_after(wait + self.op_timeout):
                    response = await trio_asyncio.aio_as_trio(pubsub.parse_response)(
                        block=False, timeout=wait
                    )
                if response is None:
                    if pinged:
                        raise self._unavailable("subscribe", "no answer to PING")
                    await self._call("ping", pubsub.ping)
                    pinged = True
                    continue
                pinged = False
                if isinstance(response, list) and len(response) == 3 and response[0] == "message":
                    on_ready(str(response[2]))
        except trio.TooSlowError:
            raise self._unavailable("subscribe", "pub/sub read timed out") from None
        finally:
            with trio.move_on_after(self.op_timeout) as scope:
                scope.shield = True
                try:
                    await trio_asyncio.aio_as_trio(pubsub.aclose)()
                except (RedisError, OSError) as exc:
                    log.debug("closing the pub/sub connection: %s", exc)


@asynccontextmanager
async def open_redis_tier(
    url: str, *, prefix: str = "stackduck", op_timeout: float = 5.0, must_connect: bool = True
) -> AsyncIterator[RedisTier]:
    """An open :class:`RedisTier`, closed at exit.

    Runs inside the current trio-asyncio loop, or opens one for the duration
    (one loop per process is enough: nest further users inside this block).
    Raises TierUnavailable when Redis cannot be reached, unless
    ``must_connect`` is false: then the failure is logged and the tier is
    yielded anyway (its operations fail until Redis answers; the scripts are
    loaded on first use) -- a server starts while Redis is down.
    """
    if trio_asyncio.current_loop.get() is None:
        async with trio_asyncio.open_loop():
            async with open_redis_tier(
                url, prefix=prefix, op_timeout=op_timeout, must_connect=must_connect
            ) as tier:
                yield tier
        return
    tier = RedisTier(url, prefix=prefix, op_timeout=op_timeout)
    try:
        try:
            await tier.open()
        except TierUnavailable as exc:
            if must_connect:
                raise
            log.warning("Redis queue tier unreachable at start (%s); starting without it", exc)
        yield tier
    finally:
        await tier.close()
