-- Applies a list of changes to one portfolio's persisted state, atomically and idempotently.
--
-- KEYS[1]  portfolio state: hash
--            q                  the portfolio's quality
--            s:<sender>:status  number status; s:<sender>:since when it last changed (us)
--            s:<sender>:quality number quality
--            t:<name>:status    template status event; t:<name>:quality template quality
--            a:<key>            account alert body
--            n:<display number> phone number id
-- KEYS[2]  opted-out recipients: set of recipient hashes
-- KEYS[3]  service windows: sorted set, member = (sender, recipient) hash, score = closing time
-- KEYS[4..] scope state hashes that tier/elig/flag changes name by index (see admit.lua)
-- ARGV[1]  state TTL (ms), ARGV[2] service window (us)
-- ARGV[3..] changes, each an op name and its arguments:
--   tier <key index> <name> <limit> <at>  sets the tier; `since` moves to now when the name changes
--   (for tier, sst and tst, <at> is when the event happened, '' = now; an event older than the
--   last one applied to the same item is skipped: its time is kept in `tat`, s:<sender>:at or
--   t:<name>:at)
--   elig <key index> <us or ''>          flag <key index> <us or ''>
--   q <quality>    sst <sender> <status> <at>    sq <sender> <quality>
--   tst <template> <status> <at>    tq <template> <quality>
--   opt <recipient hash> <1 or 0>    alert <key> <body>    alias <display> <id>
--   in <service-window hash> <us or ''>   opens the window until min(then, now) + service window
--
-- Returns the server's time (us).

local now = tg_now()
local ttl = ARGV[1]
local service_window = tonumber(ARGV[2])
local touched = {}

-- Whether an event at `at` ('' = now) is not older than the last applied to this item; if so,
-- it becomes the last.
local function newer(key, field, at)
  local t = now
  if at ~= '' then
    t = tonumber(at)
  end
  if t < (tonumber(redis.call('HGET', key, field)) or 0) then
    return false
  end
  redis.call('HSET', key, field, tg_fmt(t))
  return true
end

local function set_or_clear(key, field, value)
  if value == '' then
    redis.call('HDEL', key, field)
  else
    redis.call('HSET', key, field, value)
  end
end

local i = 3
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'tier' then
    local key = KEYS[tonumber(ARGV[i + 1])]
    if newer(key, 'tat', ARGV[i + 4]) then
      if redis.call('HGET', key, 'tier') ~= ARGV[i + 2] then
        redis.call('HSET', key, 'since', tg_fmt(now))
      end
      redis.call('HSET', key, 'tier', ARGV[i + 2], 'limit', ARGV[i + 3])
    end
    touched[key] = true
    i = i + 5
  elseif op == 'elig' or op == 'flag' then
    local key = KEYS[tonumber(ARGV[i + 1])]
    set_or_clear(key, op, ARGV[i + 2])
    touched[key] = true
    i = i + 3
  elseif op == 'q' then
    redis.call('HSET', KEYS[1], 'q', ARGV[i + 1])
    i = i + 2
  elseif op == 'sst' then
    local field = 's:' .. ARGV[i + 1]
    if newer(KEYS[1], field .. ':at', ARGV[i + 3]) then
      if redis.call('HGET', KEYS[1], field .. ':status') ~= ARGV[i + 2] then
        redis.call('HSET', KEYS[1], field .. ':since', tg_fmt(now))
      end
      redis.call('HSET', KEYS[1], field .. ':status', ARGV[i + 2])
    end
    i = i + 4
  elseif op == 'sq' then
    redis.call('HSET', KEYS[1], 's:' .. ARGV[i + 1] .. ':quality', ARGV[i + 2])
    i = i + 3
  elseif op == 'tst' then
    local field = 't:' .. ARGV[i + 1]
    if newer(KEYS[1], field .. ':at', ARGV[i + 3]) then
      redis.call('HSET', KEYS[1], field .. ':status', ARGV[i + 2])
    end
    i = i + 4
  elseif op == 'tq' then
    redis.call('HSET', KEYS[1], 't:' .. ARGV[i + 1] .. ':quality', ARGV[i + 2])
    i = i + 3
  elseif op == 'opt' then
    if ARGV[i + 2] == '1' then
      redis.call('SADD', KEYS[2], ARGV[i + 1])
    else
      redis.call('SREM', KEYS[2], ARGV[i + 1])
    end
    i = i + 3
  elseif op == 'alert' then
    redis.call('HSET', KEYS[1], 'a:' .. ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  elseif op == 'alias' then
    redis.call('HSET', KEYS[1], 'n:' .. ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  elseif op == 'in' then
    local at = now
    if ARGV[i + 2] ~= '' then
      -- A timestamp ahead of this clock cannot hold a window open longer than one from now.
      at = math.min(tonumber(ARGV[i + 2]), now)
    end
    redis.call('ZADD', KEYS[3], 'GT', tg_fmt(at + service_window), ARGV[i + 1])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tg_fmt(now))
    redis.call('PEXPIRE', KEYS[3], math.floor(service_window / 1000) + 1000)
    i = i + 3
  else
    return redis.error_reply('unknown change ' .. tostring(op))
  end
end

redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
for key in pairs(touched) do
  redis.call('PEXPIRE', key, ttl)
end
return now
