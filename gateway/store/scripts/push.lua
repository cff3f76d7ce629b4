-- Write what the voice agent sent: a state patch and messages, in one round trip, one slot.
-- KEYS[1] session hash, KEYS[2] turns zset, KEYS[3] messages list
-- ARGV: sid, epoch, base version, new version, state ('' : unchanged), base seq,
--       acked seq, window, now_ms, ttl_ms, push id, message...
-- Every argument is checked before the first write (check.lua).
local problem = arity(11, true)
  or text(1, 'session_id', 1, MAX_SESSION_ID)
  or int(2, 'epoch', 0)
  or int(3, 'base_version', 0)
  or int(4, 'version', 0)
  or optional(sealed, 5, 'state')
  or int(6, 'base_seq', 0)
  or int(7, 'acked_seq', 0)
  or int(8, 'window', 0)
  or int(9, 'now_ms', 0)
  or int(10, 'ttl_ms', 1)
  or text(11, 'push_id', 1, MAX_WRITE_ID)
  or all_sealed(12, 'message')
if problem then
  return problem
end
if tonumber(ARGV[6]) + #ARGV - 11 > MAX_INT then
  return bad('base_seq')
end
local cur = redis.call('HMGET', KEYS[1], 'sid', 'ver', 'ended', 'epoch', 'seq', 'push')
-- A session stored before messages existed has no seq: it has sent none.
cur[5] = tonumber(cur[5] or '0')
local refused = fenced(cur, ARGV[1], ARGV[2])
if refused then
  return refused
end
if cur[3] then
  return {'ended'}
end
if cur[6] == ARGV[11] then
  -- An earlier try of this very push landed; only its reply was lost. Write, so that a
  -- WAIT after this call covers that try too.
  -- never back in time: a turn may have been written since this push was built.
  local updated = tonumber(redis.call('HGET', KEYS[1], 'updated') or '0')
  redis.call('HSET', KEYS[1], 'updated', math.max(updated, tonumber(ARGV[9])))
  return {'ok'}
end
local count = #ARGV - 11
local seq = tonumber(ARGV[6]) + count
if cur[2] ~= ARGV[3] or cur[5] ~= tonumber(ARGV[6]) then
  return {'conflict', cur[2]}
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'ver', ARGV[4], 'state', ARGV[5])
end
redis.call('HSET', KEYS[1], 'seq', seq, 'updated', ARGV[9], 'push', ARGV[11])
if count > 0 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 12))
end
-- Keep at most the window, and nothing the client acknowledged.
local window = tonumber(ARGV[8])
local held = redis.call('LLEN', KEYS[3])
local drop = math.max(held - window, tonumber(ARGV[7]) - (seq - held))
if drop >= held then
  redis.call('DEL', KEYS[3])
elseif drop > 0 then
  redis.call('LTRIM', KEYS[3], drop, -1)
end
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ARGV[10])
end
return {'ok'}
