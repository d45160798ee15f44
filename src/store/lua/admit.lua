-- Decides messages in order within one limit scope, and writes what they count, atomically.
--
-- KEYS[1]  rolling window: sorted set, member = recipient hash, score = last counted contact (us)
-- KEYS[2]  scope state: hash {tier, limit, seq = last score handed out, day = day of KEYS[3]}
-- KEYS[3]  unique recipients today (HyperLogLog), used only by unlimited tiers
-- KEYS[4]  service windows of the portfolio: sorted set, member = (sender, recipient) hash,
--          score = closing time (us)
-- ARGV[1]  rolling window (us)
-- ARGV[2]  fallback tier name, ARGV[3] its limit (-1 = unlimited), used when none is persisted
-- ARGV[4]  scope state TTL (ms)
-- ARGV[5], ARGV[6], ...  pairs of (recipient hash, service-window hash or '')
--
-- Returns {tier, limit, {reason, lease score, retry after (us), counted, next slot (us)} x N},
-- flattened after the first two. Reasons: 1 new recipient, 2 already counted, 3 service window,
-- 4 limit reached. The rules are those of `policy::decide`.

local now = tg_now()
local window = tonumber(ARGV[1])
local tier, limit, seq, day = tg_meta(KEYS[2], ARGV[2], ARGV[3])
local out = {}

local function window_open(service_member)
  if service_member == '' then
    return false
  end
  local closes = redis.call('ZSCORE', KEYS[4], service_member)
  return closes ~= false and tonumber(closes) > now
end

if limit < 0 then
  local today = math.floor(now / US_PER_DAY)
  if day ~= today then
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[2], 'day', today)
    day = today
  end
  for i = 5, #ARGV, 2 do
    local reason = 3
    if not window_open(ARGV[i + 1]) then
      reason = 2
      if redis.call('PFADD', KEYS[3], ARGV[i]) == 1 then
        reason = 1
      end
    end
    local counted = redis.call('PFCOUNT', KEYS[3])
    for _, v in ipairs({reason, 0, 0, counted, 0}) do
      out[#out + 1] = v
    end
  end
  redis.call('PEXPIRE', KEYS[3], 2 * US_PER_DAY / 1000)
else
  tg_expire(KEYS[1], now, window)
  local count = redis.call('ZCARD', KEYS[1])
  for i = 5, #ARGV, 2 do
    local member = ARGV[i]
    local reason, lease, retry = 3, 0, 0
    if not window_open(ARGV[i + 1]) then
      local counted_already = redis.call('ZSCORE', KEYS[1], member)
      if counted_already or count < limit then
        seq = math.max(now, seq + 1)
        redis.call('ZADD', KEYS[1], tg_fmt(seq), member)
        if counted_already then
          reason = 2
        else
          reason, lease, count = 1, seq, count + 1
        end
      else
        reason = 4
        local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
        retry = math.max(tonumber(oldest[2]) + window - now, 1000)
      end
    end
    local counted, next_slot = tg_usage(limit, KEYS[1], KEYS[3], day, now, window)
    for _, v in ipairs({reason, lease, retry, counted, next_slot}) do
      out[#out + 1] = v
    end
  end
  redis.call('HSET', KEYS[2], 'seq', tg_fmt(seq))
  redis.call('PEXPIRE', KEYS[1], math.floor(window / 1000) + 1000)
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])

return {tier, limit, out}
