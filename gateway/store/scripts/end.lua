-- Mark a session ended (bye) so that its keys live for the end-of-session TTL.
-- KEYS[1] session hash, KEYS[2] turns zset, KEYS[3] messages list
-- ARGV: sid, now_ms, end_ttl_ms, epoch
-- Every argument is checked before the first write (check.lua).
local problem = arity(4)
  or text(1, 'session_id', 1, MAX_SESSION_ID)
  or int(2, 'now_ms', 0)
  or int(3, 'end_ttl_ms', 1)
  or int(4, 'epoch', 0)
if problem then
  return problem
end
local cur = redis.call('HMGET', KEYS[1], 'sid', 'ended', 'epoch')
if cur[1] ~= ARGV[1] then
  return 0
end
if cur[2] then
  -- Ended before (a retried bye whose reply was lost): write, so that a WAIT after this
  -- call covers the first try too.
  redis.call('HSET', KEYS[1], 'updated', ARGV[2])
  return 0
end
if cur[3] ~= ARGV[4] then
  -- A connection that a newer hello superseded cannot end the session under it.
  return -1
end
redis.call('HSET', KEYS[1], 'ended', ARGV[2], 'updated', ARGV[2])
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return 1
