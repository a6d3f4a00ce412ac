"""Every Redis key name and Lua script idemproxy uses, in one place.

Layout, for key prefix ``idem`` and an operation id ``ab12...`` (hex)::

    idem:{ab}:op:ab12...    hash: the operation record (fields: ``store.codec``)
    idem:{ab}:due           sorted set: op ids the reconciler must look at, by due time (ms)
    idem:done:ab12...       pub/sub channel: "the record changed", payload = new state

The hash tag ``{ab}`` is the id's first byte, so every key of one operation
lives in one cluster slot and the reconciler's index is spread over 256
shards instead of one hot key.
"""

from __future__ import annotations

SHARD_COUNT = 256


class RedisKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.channel_prefix = f"{prefix}:done:"

    @staticmethod
    def shard(op_id: str) -> str:
        return op_id[:2]

    def record(self, op_id: str) -> str:
        return f"{self.prefix}:{{{op_id[:2]}}}:op:{op_id}"

    def due(self, op_id: str) -> str:
        return f"{self.prefix}:{{{op_id[:2]}}}:due"

    def due_shards(self) -> list[str]:
        return [f"{self.prefix}:{{{shard:02x}}}:due" for shard in range(SHARD_COUNT)]

    def channel(self, op_id: str) -> str:
        return self.channel_prefix + op_id

    def keepalive_channel(self) -> str:
        return f"{self.prefix}:hello"


# KEYS[1]  record hash
# KEYS[2]  due index of the record's shard
# ARGV[1]  op id
# ARGV[2]  owner of the new record (unique per attempt)
# ARGV[3]  due time in ms (the lease expiry)
# ARGV[4]  evidence line (JSON)
# ARGV[5..] field, value, ... of the new record
# Returns  {1} when the record was created, or already created by this owner
#          (a retried call); {0, {field, value, ...}} with the existing record.
RESERVE = """
local owner = redis.call('HGET', KEYS[1], 'o')
if owner then
  if owner == ARGV[2] then return {1} end
  return {0, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'e', ARGV[4], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {1}
"""

# KEYS[1]  record hash
# KEYS[2]  due index of the record's shard
# ARGV[1]  op id
# ARGV[2]  expected fence
# ARGV[3]  expected states, space-delimited with a leading and trailing space
# ARGV[4]  new state
# ARGV[5]  new fence
# ARGV[6]  new owner
# ARGV[7]  ttl in ms; 0 keeps the record until resolved
# ARGV[8]  due time in ms for the reconciler; 0 removes it from the index
# ARGV[9]  evidence line (JSON), appended
# ARGV[10] pub/sub channel announcing the change
# ARGV[11..] field, value, ... of the new record
# Returns  {1} applied (or already applied by this same owner and fence: a
#          retried call); {0, {field, value, ...}} guard failed, with the
#          current record; {-1} no such record.
TRANSITION = """
local current = redis.call('HMGET', KEYS[1], 's', 'f', 'o')
if not current[1] then return {-1} end
if current[1] == ARGV[4] and current[2] == ARGV[5] and current[3] == ARGV[6] then
  return {1}
end
if current[2] ~= ARGV[2] or not string.find(ARGV[3], ' ' .. current[1] .. ' ', 1, true) then
  return {0, redis.call('HGETALL', KEYS[1])}
end
local evidence = redis.call('HGET', KEYS[1], 'e')
if evidence and #evidence > 0 then evidence = evidence .. '\\n' .. ARGV[9] else evidence = ARGV[9] end
redis.call('HSET', KEYS[1], 'e', evidence, unpack(ARGV, 11))
if tonumber(ARGV[7]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
else
  redis.call('PERSIST', KEYS[1])
end
if tonumber(ARGV[8]) > 0 then
  redis.call('ZADD', KEYS[2], ARGV[8], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('PUBLISH', ARGV[10], ARGV[4])
return {1}
"""
