-- Decides messages in order within one limit scope, and writes what they count, atomically.
--
-- KEYS[1]  rolling window: hash, every contact exact to the us (layout at the top of window.lua):
--            '#'      header {count, entries, first and last chunk, bucket level and split,
--                     sweep cursor, trimmed-up-to, last score, oldest score, legacy}
--            'b<id>'  bucket of recipients by hash: <base 7 B> then <hash 8 B><score - base 5 B>
--                     per recipient, in score order
--            'c<id>'  chunk of the time log: <base 7 B> then <score - base 5 B> per contact, in order
--            'd<p>', 'D'  directory of the chunks' bases and live counts, in pages of 128
-- KEYS[2]  scope state: hash {tier, limit, since, seq = last score handed out, elig, flag}
--          (field names: FIELD_* in the prelude)
-- KEYS[3]  service windows of the portfolio: sorted set, member = (sender, recipient) hash,
--          score = closing time (us)
-- KEYS[4]  opted-out recipients of the portfolio: set of recipient hashes
-- KEYS[5]  portfolio state: hash {s:<sender>:status, t:<template>:status,
--          tl:<language>:<template>:status, tls:<template>, ...} (see apply.lua)
-- KEYS[6]  the window as the previous version kept it (sorted set, member = recipient hash, score
--          = last contact), read until its contacts leave (see window.lua)
-- KEYS[7..] what the scope remembers under the idempotency keys of the messages that carry one:
--          a string '<reason>:<score>:<recipient hash>' (`policy::Remembered`) that expires when
--          the contact at <score> leaves the window
-- ARGV[1]  rolling window (us)
-- ARGV[2]  fallback tier name, ARGV[3] its limit (-1 = unlimited), used when none is persisted
-- ARGV[4]  state TTL (ms)
-- ARGV[5]  basis points of the limit kept from marketing to new recipients
-- ARGV[6]  deadline (us, by this clock): started later, the script writes nothing and answers
--          the DEADLINE_PASSED error with now (see tg_deadline_passed)
-- ARGV[7..10]  the window's layout: entries per bucket, contacts per chunk, us a chunk spans at
--          most, us a bucket spans at most (both <= 2^40)
-- ARGV[11], ...  eight per message: recipient hash, service-window hash or '', category code
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
-- Cost per message: one bucket (32 to 64 entries, found with string.find) and the log's tail
-- chunk; a recipient counted again also removes its old score from its chunk, found by binary
-- searches in the directory's top and one of its pages (128 chunks). Dropping contacts that left
-- the window is amortised (each leaves once, by chunk). Buckets split or merge one at a time, each
-- O(`load`); every change of the log also updates a count in a directory page and in its top.
-- A denial that waits for the window reads the oldest contact (in the header); above its
-- threshold (after a downgrade, or between the marketing cap and the limit) it finds the contact
-- at rank count - threshold by walking the counts of the top (one per 128 chunks) and of one page.
-- No step reads the whole window.
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
local w = tg_window(KEYS[1], KEYS[6], now, window, {load = tonumber(ARGV[7]), chunk = tonumber(ARGV[8]),
  chunk_span = tonumber(ARGV[9]), bucket_span = tonumber(ARGV[10])})
-- Scores only grow, also past a state hash that was lost.
seq = math.max(seq, w.last)

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
  if r.score > now - window and w:contact(r.member) then
    return r
  end
  return nil
end

w:trim()

for i = 11, #ARGV, 8 do
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
    local count = w:count()
    if w:contact(member) then
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
      w:write(member, seq)
      written = seq
      if reason == REASON_NEW_RECIPIENT then
        lease = seq
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
  -- The usage after this message: the count is kept; only the oldest contact is read.
  local count = w:count()
  local next_slot = 0
  local oldest = w:first()
  if oldest then
    next_slot = oldest + window
  end
  if threshold then
    -- Until the count drops below the threshold: the contact at rank count - threshold
    -- leaves (the oldest only when the count is at the threshold). With none (a cap or
    -- limit of 0 and nothing counted), a whole window.
    local leaving = w:nth(math.max(count - threshold, 0))
    if leaving then
      retry = math.max(leaving + window - now, MIN_RETRY_AFTER)
    else
      retry = math.max(window, MIN_RETRY_AFTER)
    end
  end
  for _, v in ipairs({reason, lease, retry, count, next_slot}) do
    out[#out + 1] = v
  end
end

redis.call('HSET', KEYS[2], FIELD_SEQ, tg_fmt(seq))
w:tidy()
w:flush()
tg_keep_meta(KEYS[2], ARGV[4], window, now, seq)
redis.call('PEXPIRE', KEYS[4], ARGV[4])
redis.call('PEXPIRE', KEYS[5], ARGV[4])

return {tier, limit, now, out, replayed}
