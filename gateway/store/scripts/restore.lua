-- Find and load the session of a caller key, or replace a missing or stale one.
-- Mirrors gateway/core/resume.py classify(); one round trip, one hash slot.
-- KEYS[1] session hash, KEYS[2] turns zset
-- ARGV: now_ms, max_age_ms (-1: none), ttl_ms, token ('' : none),
--       candidate sid, candidate token, candidate state
-- Returns {outcome} for refused and ended, else
--         {outcome, sid, token, version, state, created, updated, {turn_id, version, ...}}
local now = tonumber(ARGV[1])
local max_age = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'sid', 'tok', 'ver', 'state', 'created', 'updated', 'ended',
  'origin')
if h[1] == ARGV[5] then
  -- Our own candidate: this is a retry of a restore whose reply was lost. Answer as the
  -- first attempt did (miss or stale), whatever token the hello carried.
  return {h[8], h[1], h[2], h[3], h[4], h[5], h[6], redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
end
local outcome = 'miss'
if h[1] then
  if h[7] then
    return {'ended'}
  end
  if max_age >= 0 and now - tonumber(h[6]) > max_age then
    outcome = 'stale'
  else
    outcome = 'hit'
    -- Digests, not tokens, are compared, so the comparison's timing does not depend on
    -- how much of a guessed token is right.
    if ARGV[4] ~= '' and redis.sha1hex(ARGV[4]) ~= redis.sha1hex(h[2]) then
      if h[3] ~= '0' then
        return {'refused'}
      end
      -- Nothing written yet: a client whose welcome was lost after its old session was
      -- replaced comes back with the old token. It gets what the creator got.
      outcome = h[8] or 'miss'
    end
    redis.call('HSET', KEYS[1], 'updated', ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
    local turns = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    return {outcome, h[1], h[2], h[3], h[4], h[5], ARGV[1], turns}
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'sid', ARGV[5], 'tok', ARGV[6], 'ver', '0', 'state', ARGV[7],
  'created', ARGV[1], 'updated', ARGV[1], 'origin', outcome)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {outcome, ARGV[5], ARGV[6], '0', ARGV[7], ARGV[1], ARGV[1], {}}
