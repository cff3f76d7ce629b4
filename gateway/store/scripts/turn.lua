-- Write the snapshot after a turn and record its turn ID; one round trip, one hash slot.
-- KEYS[1] session hash, KEYS[2] turns zset, KEYS[3] messages list
-- ARGV: sid, base version, new version, state (sealed), turn_id, now_ms, ttl_ms, turns kept,
--       epoch, write id
-- Every argument is checked before the first write (check.lua).
local problem = arity(10)
  or text(1, 'session_id', 1, MAX_SESSION_ID)
  or int(2, 'base_version', 0)
  or int(3, 'version', 0)
  or sealed(4, 'state')
  or text(5, 'turn_id', 1, MAX_TURN_ID)
  or int(6, 'now_ms', 0)
  or int(7, 'ttl_ms', 1)
  or int(8, 'turns_kept', 1)
  or int(9, 'epoch', 0)
  or text(10, 'write_id', 1, MAX_WRITE_ID)
if problem then
  return problem
end
local cur = redis.call('HMGET', KEYS[1], 'sid', 'ver', 'ended', 'epoch')
local refused = fenced(cur, ARGV[1], ARGV[9])
if refused then
  return refused
end
local seen = redis.call('ZSCORE', KEYS[2], ARGV[5])
if seen then
  -- A write, so that a WAIT after this call also covers the write that applied the turn
  -- (replication is one ordered stream; WAIT counts this connection's last write).
  local updated = tonumber(redis.call('HGET', KEYS[1], 'updated') or '0')
  redis.call('HSET', KEYS[1], 'updated', math.max(updated, tonumber(ARGV[6])))
  -- The stored state being this very write's (its write ID; the sealed state differs on
  -- every try) means an earlier try succeeded and only its reply was lost: report it as
  -- applied, so the caller adopts it.
  if seen == ARGV[3] and cur[2] == ARGV[3] and redis.call('HGET', KEYS[1], 'wid') == ARGV[10] then
    return {'ok', seen}
  end
  return {'dup', seen}
end
if cur[3] then
  return {'ended'}
end
if cur[2] ~= ARGV[2] then
  return {'conflict', cur[2]}
end
redis.call('HSET', KEYS[1], 'ver', ARGV[3], 'state', ARGV[4], 'updated', ARGV[6], 'wid', ARGV[10])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[8]) + 1))
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ARGV[7])
end
return {'ok', ARGV[3]}
