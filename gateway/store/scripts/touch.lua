-- Renew a served session: restart its age and TTL and extend this instance's lease.
-- KEYS[1] session hash, KEYS[2] turns zset, KEYS[3] messages list
-- ARGV: sid, now_ms, ttl_ms, epoch, owner ('' : release the session), lease_ms
-- Returns 1, 0 for a session ended or gone, -1 when a newer hello superseded the epoch.
-- Every argument is checked before the first write (check.lua).
local problem = arity(6)
  or text(1, 'session_id', 1, MAX_SESSION_ID)
  or int(2, 'now_ms', 0)
  or int(3, 'ttl_ms', 1)
  or int(4, 'epoch', 0)
  or text(5, 'owner', 0, MAX_OWNER)
  or lease(6, 2)
if problem then
  return problem
end
local cur = redis.call('HMGET', KEYS[1], 'sid', 'ended', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] then
  return 0
end
if cur[3] ~= ARGV[4] then
  return -1
end
redis.call('HSET', KEYS[1], 'updated', ARGV[2], 'owner', ARGV[5],
  'lease', tonumber(ARGV[2]) + tonumber(ARGV[6]))
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return 1
