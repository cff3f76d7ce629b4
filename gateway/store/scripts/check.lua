-- Argument checks, and the fence of a write: redis_store.py puts this file in front of every
-- other script. A script checks all its arguments before its first write, because Redis keeps
-- the writes of a script that fails half way. Each check returns nil, or the error reply
-- 'hangon bad argument <name>'; a script chains them with `or` and returns the first error
-- before it changes anything. The limits are gateway/store/base.py's; keep them alike.

local MAX_INT = 9007199254740991
local MAX_SESSION_ID = 128
local MAX_TURN_ID = 512
local MAX_OWNER = 512
local MAX_WRITE_ID = 128
local MAX_SEALED = 16777216
local MAX_MESSAGES = 1024

local function bad(name)
  return redis.error_reply('ERR hangon bad argument ' .. name)
end

-- Three keys, and n arguments (with extra, up to MAX_MESSAGES more).
local function arity(n, extra)
  if #KEYS ~= 3 then
    return bad('keys')
  end
  if #ARGV < n or #ARGV > n + (extra and MAX_MESSAGES or 0) then
    return bad('count')
  end
end

-- ARGV[i] is an integer from low to 2^53 - 1, written as Python's str(int) writes it.
-- Lua numbers are doubles, exact up to 2^53; tonumber also takes hex, exponents, spaces,
-- 'nan' and 'inf', so the digits must be the integer's own. -1 means "none" where low is -1.
local function int(i, name, low)
  local s = ARGV[i]
  local n = tonumber(s)
  if n == nil or not (n >= low and n <= MAX_INT) or string.format('%d', n) ~= s then
    return bad(name)
  end
end

-- ARGV[i] is text of low to high bytes.
local function text(i, name, low, high)
  local size = #ARGV[i]
  if size < low or size > high then
    return bad(name)
  end
end

-- ARGV[i] is a resume token's SHA-256 digest in hex (core/resume.py token_digest).
local function digest(i, name)
  local s = ARGV[i]
  if #s ~= 64 or string.find(s, '[^0-9a-f]') then
    return bad(name)
  end
end

-- ARGV[i] is what Keyring.seal made (core/sealing.py): byte 1, the key ID's length, the key
-- ID, a 12-byte nonce, the ciphertext and its 16-byte tag; at most MAX_SEALED bytes.
local function sealed(i, name)
  local s = ARGV[i]
  local size = #s
  local version, kid = string.byte(s, 1, 2)
  if size > MAX_SEALED or version ~= 1 or kid == nil or size < 2 + kid + 12 + 16 then
    return bad(name)
  end
end

-- ARGV[i] is '' (none), or passes check(i, name).
local function optional(check, i, name)
  if ARGV[i] ~= '' then
    return check(i, name)
  end
end

-- ARGV[first] on are sealed.
local function all_sealed(first, name)
  for i = first, #ARGV do
    local problem = sealed(i, name)
    if problem then
      return problem
    end
  end
end

-- ARGV[i] is a lease in milliseconds, an integer from 0, that ends by 2^53 - 1 counted from
-- ARGV[now]. Chain it after the check of ARGV[now].
local function lease(i, now)
  local problem = int(i, 'lease_ms', 0)
  if problem or tonumber(ARGV[now]) + tonumber(ARGV[i]) <= MAX_INT then
    return problem
  end
  return bad('lease_ms')
end

-- The fence of a write (a turn or a push), once its arguments passed: {'gone'} if the
-- session hash holds another session than sid, or none; {'superseded'} if a newer hello
-- moved its epoch past epoch; else nil. cur is the hash's HMGET of 'sid', 'ver', 'ended',
-- 'epoch', and any more fields after them.
local function fenced(cur, sid, epoch)
  if cur[1] ~= sid then
    return {'gone'}
  end
  if cur[4] ~= epoch then
    return {'superseded'}
  end
end
