-- Find and load the session of a caller key, or replace a missing or stale one.
-- Mirrors gateway/core/resume.py classify() and plan_replay(); one round trip, one hash slot.
-- KEYS[1] session hash, KEYS[2] turns zset, KEYS[3] messages list
-- ARGV: now_ms, max_age_ms (-1: none), ttl_ms, token digest ('' : none),
--       candidate sid, candidate token digest, candidate state (sealed), last_seq (-1: none),
--       owner (this instance's ID), lease_ms
-- Tokens are SHA-256 digests; tok, prev, dead and spare are the current, previous, retired
-- and spare ones (gateway/core/resume.py Tokens): a hit rotates them so that the candidate's
-- is current.
-- Returns {outcome} for ended, {'refused'} or {'refused', 'replayed'} (a retired token),
--         else
--         {outcome, sid, token, version, state, created, updated, {turn_id, version, ...},
--          epoch, seq, first held seq, {message, ...} from the replay start, last push id,
--          displaced owner ('' : none)}
-- The caller becomes the owner, with a lease until now + lease_ms. The displaced owner is
-- another instance whose lease had not run out: it still serves the session and is told.
-- Every argument is checked before the first write (check.lua).
local problem = arity(10)
  or int(1, 'now_ms', 0)
  or int(2, 'max_age_ms', -1)
  or int(3, 'ttl_ms', 1)
  or optional(digest, 4, 'token')
  or text(5, 'session_id', 1, MAX_SESSION_ID)
  or digest(6, 'candidate_token')
  or sealed(7, 'state')
  or int(8, 'last_seq', -1)
  or text(9, 'owner', 0, MAX_OWNER)
  or lease(10, 1)
if problem then
  return problem
end
local now = tonumber(ARGV[1])
local max_age = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'sid', 'tok', 'ver', 'state', 'created', 'updated', 'ended',
  'origin', 'epoch', 'seq', 'push', 'owner', 'lease', 'prev', 'dead', 'spare')
local lease = now + tonumber(ARGV[10])

local function replay(seq)
  local held = redis.call('LLEN', KEYS[3])
  local first = seq - held + 1
  local want = tonumber(ARGV[8]) + 1
  if want < 1 then
    want = 1
  end
  local from = math.max(want, first) - first
  return first, redis.call('LRANGE', KEYS[3], from, -1)
end

local function loaded(outcome, updated, displaced)
  local seq = tonumber(h[10] or '0')
  local first, msgs = replay(seq)
  return {outcome, h[1], h[2], h[3], h[4], h[5], updated,
    redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'), h[9], seq, first, msgs, h[11] or '',
    displaced}
end

if h[1] == ARGV[5] then
  -- Our own candidate: this is a retry of a restore whose reply was lost. Answer as the
  -- first attempt did (miss or stale), whatever token the hello carried.
  return loaded(h[8], h[6], '')
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
    local presented = ARGV[4]
    local previous = h[14] or ''
    local spare = h[16] or ''
    local function same(a, b)
      return a ~= '' and a == b
    end
    if presented ~= '' and not (same(presented, h[2]) or same(presented, previous)
        or same(presented, spare)) then
      if h[3] ~= '0' then
        if h[15] and presented == h[15] then
          return {'refused', 'replayed'}
        end
        return {'refused'}
      end
      -- Nothing written yet: a client whose welcome was lost after its old session was
      -- replaced comes back with the old token. It gets what the creator got.
      outcome = h[8] or 'miss'
    end
    local displaced = ''
    -- An owner of '' released the session (drained, or its linger ended).
    if h[12] and h[12] ~= '' and h[12] ~= ARGV[9] and tonumber(h[13] or '0') > now then
      displaced = h[12]
    end
    -- A new epoch: writes of every earlier connection to this session are refused.
    h[9] = tostring(redis.call('HINCRBY', KEYS[1], 'epoch', 1))
    redis.call('HSET', KEYS[1], 'updated', ARGV[1], 'owner', ARGV[9], 'lease', lease)
    -- Rotate (Tokens.rotate): back with the previous token, it stays valid and the current
    -- one becomes the spare (its welcome was lost, or its resume raced this one); else the
    -- token used (the current, or the spare) becomes the previous, and the previous retires.
    if same(presented, previous) then
      local keep = h[2]
      if ARGV[6] == h[2] then
        keep = spare
      end
      redis.call('HSET', KEYS[1], 'tok', ARGV[6], 'spare', keep)
    else
      local used = h[2]
      if same(presented, spare) then
        used = presented
      end
      redis.call('HSET', KEYS[1], 'tok', ARGV[6], 'prev', used, 'spare', '')
      if previous ~= '' then
        redis.call('HSET', KEYS[1], 'dead', previous)
      end
    end
    for i = 1, 3 do
      redis.call('PEXPIRE', KEYS[i], ARGV[3])
    end
    return loaded(outcome, ARGV[1], displaced)
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'sid', ARGV[5], 'tok', ARGV[6], 'ver', '0', 'state', ARGV[7],
  'created', ARGV[1], 'updated', ARGV[1], 'origin', outcome, 'epoch', '1', 'seq', '0', 'owner', ARGV[9], 'lease', lease)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {outcome, ARGV[5], ARGV[6], '0', ARGV[7], ARGV[1], ARGV[1], {}, '1', 0, 1, {}, '', ''}
