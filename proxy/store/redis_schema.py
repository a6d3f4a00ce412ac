"""Every Redis key name and Lua script idemproxy uses, in one place.

Layout, for key prefix ``idem`` and an operation id ``ab12...`` (hex)::

    idem:{ab}:op:ab12...            string: the operation record, one MessagePack array
                                      (``store.redis_record``)
    idem:{ab}:due                   sorted set: op ids the reconciler must look at, by due time (ms)
    idem:{ab}:state:PENDING         sorted set: unresolved op ids by state, scored by last update
    idem:{ab}:state:UNKNOWN           (ms), for operators' listings and exact gauges
    idem:{ab}:state:NEEDS_ATTENTION
    idem:done:ab12...               pub/sub channel: "the record changed", payload = new state
    idem:{cd}:seen:cd34...          string with a TTL: a name remembered once (``remember_once``),
                                      by the SHA-256 of the name
    idem:{budget}:calls:ef56...     sorted set: a budget counter's charges (ids scored by time in
                                      ms), by the SHA-256 of the counter's name; expires a window
                                      after its last charge

The hash tag ``{ab}`` is the id's first byte, so every key of one operation
lives in one cluster slot and the indexes are spread over 256 shards instead
of a few hot keys. Budget counters are the exception: they all share the hash
tag ``{budget}``, because one request charges an identity's and a task's
counter together, atomically, in one script; in a cluster, the master owning
that slot carries every budget charge (a few sorted-set commands per forwarded
attempt).
"""

from __future__ import annotations

import hashlib

from idemproxy.lifecycle.records import UNRESOLVED_STATES, State
from idemproxy.store.redis_record import LUA_POSITIONS

SHARD_COUNT = 256
#: The order of the state indexes in every script's KEYS.
INDEXED_STATES = (State.PENDING, State.UNKNOWN, State.NEEDS_ATTENTION)
assert frozenset(INDEXED_STATES) == UNRESOLVED_STATES


class RedisKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.channel_prefix = f"{prefix}:done:"
        self._shard_indexes: dict[str, tuple[str, ...]] = {}  # built once per shard: used on every request
        # Every shard's indexes, read every second (the reconciler) and every few (the gauges).
        self._due_shards = tuple(f"{prefix}:{{{shard:02x}}}:due" for shard in range(SHARD_COUNT))
        self._state_shards = {
            state: tuple(f"{prefix}:{{{shard:02x}}}:state:{state.value}" for shard in range(SHARD_COUNT))
            for state in INDEXED_STATES
        }

    @staticmethod
    def shard(op_id: str) -> str:
        return op_id[:2]

    def record(self, op_id: str) -> str:
        return f"{self.prefix}:{{{op_id[:2]}}}:op:{op_id}"

    def due(self, op_id: str) -> str:
        return f"{self.prefix}:{{{op_id[:2]}}}:due"

    def state_index(self, op_id: str, state: State) -> str:
        return f"{self.prefix}:{{{op_id[:2]}}}:state:{state.value}"

    def script_keys(self, op_id: str) -> list[str]:
        """KEYS for RESERVE and TRANSITION: record, due index, the three state indexes."""
        shard = op_id[:2]
        indexes = self._shard_indexes.get(shard)
        if indexes is None:
            indexes = (self.due(op_id), *(self.state_index(op_id, state) for state in INDEXED_STATES))
            self._shard_indexes[shard] = indexes
        return [self.record(op_id), *indexes]

    def due_shards(self) -> list[str]:
        return list(self._due_shards)

    def state_shards(self, state: State) -> list[str]:
        return list(self._state_shards[state])

    def every_state_shard(self) -> list[str]:
        """``state_shards`` of every indexed state, one state after the other."""
        return [shard for state in INDEXED_STATES for shard in self._state_shards[state]]

    def record_pattern(self, id_prefix: str = "") -> str:
        """A SCAN pattern for the records whose op ids start with ``id_prefix`` (lower-case hex)."""
        shard = id_prefix[:2] + "?" * (2 - len(id_prefix[:2]))
        return f"{self.prefix}:{{{shard}}}:op:{id_prefix}*"

    def channel(self, op_id: str) -> str:
        return self.channel_prefix + op_id

    def marker(self, name: str) -> str:
        """A store-wide marker (``epoch``): one key, no hash tag, no TTL."""
        return f"{self.prefix}:marker:{name}"

    def keepalive_channel(self) -> str:
        return f"{self.prefix}:hello"

    def seen(self, name: str) -> str:
        """A remembered name, hash-tagged by its digest so names spread over the slots."""
        digest = hashlib.sha256(name.encode()).hexdigest()
        return f"{self.prefix}:{{{digest[:2]}}}:seen:{digest}"

    def budget(self, name: str) -> str:
        """A budget counter; every counter shares one hash tag, so one script charges several."""
        return f"{self.prefix}:{{budget}}:calls:{hashlib.sha256(name.encode()).hexdigest()}"


# Every script reads the record with cmsgpack.unpack and names its elements as
# ``_RECORD`` does: ``current[STATE]``, ``current[FENCE]``, ... (the layout, positional:
# ``store.redis_record``). Records written from Python are re-packed only by RENEW and NOTE.


def _lua_names(*names: str) -> str:
    """A Lua line naming the record elements ``names`` (``redis_record.FIELDS``) by position."""
    return f"local {', '.join(name.upper() for name in names)} = {', '.join(str(LUA_POSITIONS[n]) for n in names)}\n"


#: ``local STATE, FENCE, OWNER, LEASE_UNTIL_MS, EVIDENCE = 1, 2, 3, 4, 8``
_RECORD = _lua_names("state", "fence", "owner", "lease_until_ms", "evidence")
#: ``now``: the server's clock in ms, the one clock every lease is measured on
#: (``store.clock``). Scripts reply with it, so each call is also a reading of it.
_NOW = """local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS[1]  record
# KEYS[2]  due index of the record's shard
# KEYS[3..5] state indexes of the shard: PENDING, UNKNOWN, NEEDS_ATTENTION
# ARGV[1]  op id
# ARGV[2]  owner of the new record (unique per attempt)
# ARGV[3]  due time in ms (the lease expiry)
# ARGV[4]  the new record, packed with its first evidence
# ARGV[5]  now in ms (the state index score)
# Returns  {1, now} when the record was created, or already created by this owner
#          (a retried call); {0, now, record}: the existing record, packed (the
#          caller drops its evidence: a replay never needs it). ``now``: the
#          server's clock (ms) when it ran.
RESERVE = (
    _RECORD
    + _NOW
    + """
local raw = redis.call('GET', KEYS[1])
if raw then
  if cmsgpack.unpack(raw)[OWNER] == ARGV[2] then return {1, now} end
  return {0, now, raw}
end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return {1, now}
"""
)

# KEYS[1]  record
# KEYS[2]  due index of the record's shard
# KEYS[3..5] state indexes of the shard: PENDING, UNKNOWN, NEEDS_ATTENTION
# ARGV[1]  op id
# ARGV[2]  expected fence
# ARGV[3]  expected states, space-delimited with a leading and trailing space
# ARGV[4]  new state
# ARGV[5]  new fence
# ARGV[6]  new owner
# ARGV[7]  ttl in ms; 0 keeps the record until resolved
# ARGV[8]  due time in ms for the reconciler; 0 removes it from the index
# ARGV[9]  evidence entry (packed), appended
# ARGV[10] pub/sub channel announcing the change
# ARGV[11] index of the new state's KEYS entry (3..5), 0 for a resolved state
# ARGV[12] now in ms (the state index score)
# ARGV[13] the new record, packed up to its evidence (redis_record.pack_head)
# ARGV[14] "1": apply only once the current lease has ended by this server's clock
#          (Transition.after_the_lease), "0": regardless
# Returns  {1, now} applied (or already applied by this same owner and fence: a
#          retried call); {0, now, record} guard failed, with the current record,
#          packed (the caller drops its evidence); {-1, now} no such record.
TRANSITION = (
    _RECORD
    + _NOW
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then return {-1, now} end
local current = cmsgpack.unpack(raw)
if current[STATE] == ARGV[4] and current[FENCE] == tonumber(ARGV[5]) and current[OWNER] == ARGV[6] then
  return {1, now}
end
if current[FENCE] ~= tonumber(ARGV[2]) or not string.find(ARGV[3], ' ' .. current[STATE] .. ' ', 1, true) then
  return {0, now, raw}
end
if ARGV[14] == '1' and current[LEASE_UNTIL_MS] > now then return {0, now, raw} end
-- The new record's own bytes, completed by its evidence: never re-packed here.
local record = ARGV[13] .. cmsgpack.pack(current[EVIDENCE] .. ARGV[9])
if tonumber(ARGV[7]) > 0 then
  redis.call('SET', KEYS[1], record, 'PX', ARGV[7])
else
  redis.call('SET', KEYS[1], record)
end
if tonumber(ARGV[8]) > 0 then
  redis.call('ZADD', KEYS[2], ARGV[8], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
for i = 3, 5 do redis.call('ZREM', KEYS[i], ARGV[1]) end
local state_index = tonumber(ARGV[11])
if state_index > 0 then redis.call('ZADD', KEYS[state_index], ARGV[12], ARGV[1]) end
redis.call('PUBLISH', ARGV[10], ARGV[4])
return {1, now}
"""
)

# KEYS[1]  record
# KEYS[2]  due index of the record's shard
# ARGV[1]  op id
# ARGV[2]  fence the owner holds
# ARGV[3]  owner
# ARGV[4]  the lease's new term in ms, from now by this server's clock (the lease's
#          end is also the new due time)
# Returns  now (ms, this server's clock) when renewed; 0 when the owner no longer holds
#          the record, or its lease has already ended: an ended lease is never revived,
#          whoever is about to take the operation over.
RENEW = (
    _RECORD
    + _NOW
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local current = cmsgpack.unpack(raw)
if current[FENCE] ~= tonumber(ARGV[2]) or current[OWNER] ~= ARGV[3] then return 0 end
if current[STATE] ~= 'PENDING' and current[STATE] ~= 'UNKNOWN' then return 0 end
if current[LEASE_UNTIL_MS] <= now then return 0 end
current[LEASE_UNTIL_MS] = now + tonumber(ARGV[4])
redis.call('SET', KEYS[1], cmsgpack.pack(current), 'KEEPTTL')
redis.call('ZADD', KEYS[2], current[LEASE_UNTIL_MS], ARGV[1])
return now
"""
)

# KEYS[1]  record
# ARGV[1]  evidence entry (packed), appended
# Returns  1 appended; 0 no such record.
NOTE = (
    _RECORD
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local current = cmsgpack.unpack(raw)
current[EVIDENCE] = current[EVIDENCE] .. ARGV[1]
redis.call('SET', KEYS[1], cmsgpack.pack(current), 'KEEPTTL')
return 1
"""
)

# -- the indexes, read in one call (every shard on one server: not a cluster) -------------------

# KEYS[1..n] every shard's due index
# ARGV[1]  now in ms
# ARGV[2]  limit
# Returns  op id, due time, op id, due time, ... : the earliest ``limit`` due by now across the
#          shards (each shard's are in order: merged). One command instead of a ZRANGEBYSCORE per
#          shard, and a reply of ``limit`` ids however large the backlog (the reconciler asks
#          every second, on the connection every request uses).
DUE_IN_EVERY_SHARD = """
local limit = tonumber(ARGV[2])
local lists, next = {}, {}
for i = 1, #KEYS do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, limit)
  if #due > 0 then
    lists[#lists + 1] = due
    next[#next + 1] = 1
  end
end
local found = {}
while #found < 2 * limit do
  local best, best_score = nil, nil
  for i = 1, #lists do
    local at = next[i]
    if at < #lists[i] then
      local score = tonumber(lists[i][at + 1])
      if best == nil or score < best_score then best, best_score = i, score end
    end
  end
  if best == nil then break end
  found[#found + 1] = lists[best][next[best]]
  found[#found + 1] = lists[best][next[best] + 1]
  next[best] = next[best] + 2
end
return found
"""

# KEYS[1..n] the state indexes of every shard, one state after the other (n / ARGV[1] per state)
# ARGV[1]  how many states
# Returns  the number of op ids in each state's indexes, in KEYS order
COUNT_IN_EVERY_SHARD = """
local states = tonumber(ARGV[1])
local per_state = #KEYS / states
local counts = {}
for state = 1, states do
  local count = 0
  for i = (state - 1) * per_state + 1, state * per_state do count = count + redis.call('ZCARD', KEYS[i]) end
  counts[state] = count
end
return counts
"""


# -- budgets (appended for idemproxy.edge.budgets) ---------------------------------------------

# KEYS[1..n] budget counters (sorted sets of charge ids scored by time in ms), one hash tag
# ARGV[1]  now in ms
# ARGV[2]  charge id
# ARGV[3..] limit, window in ms: one pair per counter, in KEYS order
# Returns  {} charged to every counter (or already charged under this id: a retried
#          call); else {i, wait_ms, ...} for every full KEYS[i], and nothing charged.
#          wait_ms: until the charge that keeps KEYS[i] full slides out of its window.
CHARGE = """
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return {} end
local now = tonumber(ARGV[1])
local full = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local used = redis.call('ZCARD', KEYS[i])
  if used >= limit then
    local blocking = redis.call('ZRANGE', KEYS[i], used - limit, used - limit, 'WITHSCORES')
    full[#full + 1] = i
    full[#full + 1] = tonumber(blocking[2]) + window - now
  end
end
if #full > 0 then return full end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[i], ARGV[2 + 2 * i])
end
return {}
"""

# KEYS[1]  record (packed string)
# KEYS[2]  due index of the record's shard
# KEYS[3]  PENDING state index of the shard
# ARGV[1]  op id
# ARGV[2]  fence of the reservation
# ARGV[3]  owner of the reservation
# ARGV[4]  pub/sub channel announcing the change
# Returns  1 deleted; 0 the record is not PENDING with that owner and fence (or is gone).
UNRESERVE = (
    _RECORD
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local current = cmsgpack.unpack(raw)
if current[STATE] ~= 'PENDING' or current[FENCE] ~= tonumber(ARGV[2]) or current[OWNER] ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[4], 'GONE')
return 1
"""
)


#: KEYS[1] the marker; ARGV[1] "" (expect none) or "=" .. the expected value; ARGV[2] the new
#: value. Returns the value afterwards (false: none).
SWAP_MARKER = """
local current = redis.call('GET', KEYS[1])
local matches
if ARGV[1] == '' then
  matches = current == false
else
  matches = current == string.sub(ARGV[1], 2)
end
if matches then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return current
"""
