-- Decides messages in order within one limit scope, and writes what they count, atomically.
--
-- KEYS[1]  rolling window: sorted set, member = recipient hash, score = last counted contact (us)
-- KEYS[2]  scope state: hash {tier, limit, since, seq = last score handed out, elig, flag}
--          (field names: FIELD_* in the prelude)
-- KEYS[3]  service windows of the portfolio: sorted set, member = (sender, recipient) hash,
--          score = closing time (us)
-- KEYS[4]  opted-out recipients of the portfolio: set of recipient hashes
-- KEYS[5]  portfolio state: hash {s:<sender>:status, t:<template>:status,
--          tl:<language>:<template>:status, tls:<template>, ...} (see apply.lua)
-- KEYS[6..] what the scope remembers under the idempotency keys of the messages that carry one:
--          a string '<reason>:<score>:<recipient hash>' (`policy::Remembered`) that expires when
--          the contact at <score> leaves the window
-- ARGV[1]  rolling window (us)
-- ARGV[2]  fallback tier name, ARGV[3] its limit (-1 = unlimited), used when none is persisted
-- ARGV[4]  state TTL (ms)
-- ARGV[5]  basis points of the limit kept from marketing to new recipients
-- ARGV[6]  deadline (us, by this clock): started later, the script writes nothing and answers
--          the DEADLINE_PASSED error with now (see tg_deadline_passed)
-- ARGV[7], ...  eight per message: recipient hash, service-window hash or '', category code
--          (CATEGORY_*), template or '', sender or '', '1' when the sender is blocked by
--          configuration, template language or '' (then every language of it must be sendable),
--          index in KEYS of its idempotency key or '' (none)
--
-- Categories in MAY_BE_MARKETING get the marketing rules: a message without a category may be one.
-- Admits write no daily count: only confirmed deliveries do (see the `dlv` op of apply.lua).
-- A message whose idempotency key remembers a decision that still replays (`policy::Remembered`:
-- its contact is in the window and its recipient still counted) gets that decision back and
-- writes nothing; otherwise its key remembers its decision if it wrote, and forgets it if not.
--
-- Returns {tier, limit, now (us), {reason, lease score, retry after (us), counted, next slot (us)}
-- x N, {recipient hash of the replayed decision or '' x N}}, the fourth flattened. Reasons are
-- REASON_* codes (the tiergate.v1.Reason numbers). The rules and their order are those of
-- `policy::decide`. `admit.rs` encodes the arguments and decodes the reply.

local now = tg_now()
if now > tonumber(ARGV[6]) then
  return tg_deadline_passed(now)
end
local window = tonumber(ARGV[1])
local tier, limit, seq = tg_meta(KEYS[2], ARGV[2], ARGV[3])
local reserve = tonumber(ARGV[5])
local cap = -1
if limit >= 0 and reserve > 0 then
  cap = math.floor((limit * (10000 - reserve) + 9999) / 10000)
end
local out, replayed = {}, {}

-- What an idempotency key remembers, if it still replays (`policy::Remembered::replays`): the
-- contact is inside the window, and its recipient still counted (so not released since).
local function replay(key)
  local v = redis.call('GET', key)
  if not v then
    return nil
  end
  local a = string.find(v, ':', 1, true)
  local b = string.find(v, ':', a + 1, true)
  local r = {reason = tonumber(string.sub(v, 1, a - 1)), score = tonumber(string.sub(v, a + 1, b - 1)),
    member = string.sub(v, b + 1)}
  if r.score > now - window and redis.call('ZSCORE', KEYS[1], r.member) then
    return r
  end
  return nil
end

tg_expire(KEYS[1], now, window)
local count = redis.call('ZCARD', KEYS[1])

for i = 7, #ARGV, 8 do
  local member, service, category = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local template, sender, blocked, language = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local key = ARGV[i + 7] ~= '' and KEYS[tonumber(ARGV[i + 7])]
  local remembered = key and replay(key)
  local open = false
  if service ~= '' and not remembered then
    local closes = redis.call('ZSCORE', KEYS[3], service)
    open = closes ~= false and tonumber(closes) > now
  end
  -- For a denial that waits for the window: the count it must drop below.
  local reason, lease, retry, threshold = 0, 0, 0, nil
  -- The contact this message wrote, if any.
  local written = nil
  if remembered then
    reason = remembered.reason
    if reason == REASON_NEW_RECIPIENT then
      lease = remembered.score
    end
  elseif blocked == '1' or (sender ~= '' and tg_sender_banned(KEYS[5], sender)) then
    reason = REASON_SENDER_BLOCKED
  elseif template ~= '' and not tg_template_sendable(KEYS[5], template, language) then
    reason = REASON_TEMPLATE_BLOCKED
  elseif (not open or MAY_BE_MARKETING[category]) and redis.call('SISMEMBER', KEYS[4], member) == 1 then
    reason = REASON_OPTED_OUT
  elseif open then
    reason = REASON_SERVICE_WINDOW
  elseif category == CATEGORY_SERVICE then
    reason = REASON_OUTSIDE_SERVICE_WINDOW
  else
    -- Unlimited tiers (limit -1) keep the window too: exact reasons and leases, and a window
    -- that is already there when the tier comes down.
    local counted_already = redis.call('ZSCORE', KEYS[1], member)
    if counted_already then
      reason = REASON_ALREADY_COUNTED
    elseif MAY_BE_MARKETING[category] and cap >= 0 and count >= cap then
      reason, threshold = REASON_HEADROOM_RESERVED, cap
    elseif limit < 0 or count < limit then
      reason = REASON_NEW_RECIPIENT
    else
      reason, threshold = REASON_LIMIT_REACHED, limit
    end
    if reason == REASON_NEW_RECIPIENT or reason == REASON_ALREADY_COUNTED then
      seq = math.max(now, seq + 1)
      redis.call('ZADD', KEYS[1], tg_fmt(seq), member)
      written = seq
      if reason == REASON_NEW_RECIPIENT then
        lease, count = seq, count + 1
      end
    end
  end
  if remembered then
    replayed[#replayed + 1] = remembered.member
  else
    replayed[#replayed + 1] = ''
    if key and written then
      local ttl = tg_ttl_until(written + window, now)
      redis.call('SET', key, reason .. ':' .. tg_fmt(written) .. ':' .. member, 'PX', ttl)
    elseif key then
      redis.call('DEL', key)
    end
  end
  -- The usage after this message: the count is kept here; only the oldest contact is read.
  local next_slot = 0
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] then
    next_slot = tonumber(oldest[2]) + window
  end
  if threshold then
    -- Until the count drops below the threshold: the contact at rank count - threshold
    -- leaves (the oldest only when the count is at the threshold). With none (a cap or
    -- limit of 0 and nothing counted), a whole window.
    local rank = count - threshold
    local leaving = oldest
    if rank > 0 then
      leaving = redis.call('ZRANGE', KEYS[1], rank, rank, 'WITHSCORES')
    end
    if leaving[2] then
      retry = math.max(tonumber(leaving[2]) + window - now, MIN_RETRY_AFTER)
    else
      retry = math.max(window, MIN_RETRY_AFTER)
    end
  end
  for _, v in ipairs({reason, lease, retry, count, next_slot}) do
    out[#out + 1] = v
  end
end

redis.call('HSET', KEYS[2], FIELD_SEQ, tg_fmt(seq))
tg_keep_scores(KEYS[1], window, now)
tg_keep_meta(KEYS[2], ARGV[4], window, now)
redis.call('PEXPIRE', KEYS[4], ARGV[4])
redis.call('PEXPIRE', KEYS[5], ARGV[4])

return {tier, limit, now, out, replayed}
