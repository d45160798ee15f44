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
--          tl:<language>:<template>:status, tls:<template>, ...} (see apply.lua); this script
--          also reads s:<sender>:mps (learnt level), s:<sender>:bo (backing off until, us) and
--          mode, and reads and writes s:<sender>:tat (the number's throughput `tat`, us)
-- KEYS[6]  the window as the previous version kept it (sorted set, member = recipient hash, score
--          = last contact), read until its contacts leave (see window.lua)
-- KEYS[7]  recipients Meta's per-user marketing limit capped: sorted set, member = recipient
--          hash, score = until when (us)
-- KEYS[8..] what the scope remembers under the idempotency keys of the messages that carry one:
--          a string '<reason>:<score>:<recipient hash>' (`policy::Remembered`) that expires when
--          the contact at <score> leaves the window; then the pair schedules of the messages the
--          pair rule applies to: a string '<tat>:<burst start>' (us, `rate::PairState`) that
--          expires at its tat
-- ARGV[1]  rolling window (us)
-- ARGV[2]  fallback tier name, ARGV[3] its limit (-1 = unlimited), used when none is persisted
-- ARGV[4]  state TTL (ms)
-- ARGV[5]  basis points of the limit kept from marketing to new recipients
-- ARGV[6]  deadline (us, by this clock): started later, the script writes nothing and answers
--          the DEADLINE_PASSED error with now (see tg_deadline_passed)
-- ARGV[7..10]  the window's layout: entries per bucket, contacts per chunk, us a chunk spans at
--          most, us a bucket spans at most (both <= 2^40)
-- ARGV[11] the portfolio's configured mode (MODE_*), unless one is persisted in `mode`
-- ARGV[12..14]  the throughput rule (`rate::ThroughputRule`): '1' when on, the default level
--          (messages per second), burst (us)
-- ARGV[15..17]  the pair rule (`rate::PairRule`): '1' when on, interval (us), burst (messages)
-- ARGV[18], ...  eleven per message: recipient hash, service-window hash or '', category code
--          (CATEGORY_*), template or '', sender or '', '1' when the sender is blocked by
--          configuration, template language or '' (then every language of it must be sendable),
--          index in KEYS of its idempotency key or '' (none), how long it may wait (us), its
--          sender's configured level or '', index in KEYS of its pair schedule or '' (no sender,
--          or the pair rule is off)
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
-- After the messaging-limit rules (`policy::decide`), the send rates govern a message with a
-- sender (`rate::govern`): its pair's schedule, then its number's throughput from the instant the
-- pair allows. Enforcing, a message the limit denies takes no rate slot; one the rates would hold
-- longer than it may wait is denied PAIR_RATE or THROUGHPUT_EXCEEDED and takes no slot; one that
-- goes takes both slots at the instant it goes (now + its wait). In shadow mode every message is
-- admitted at once (as `policy::admitted_as` when the limit denies), takes its rate slots at now,
-- and the reply names what enforcing would have answered. A replay takes no rate slot.
--
-- Returns {tier, limit, now (us), {reason, lease score, retry after (us), counted, next slot (us),
-- wait (us), shadow reason or 0} x N, {recipient hash of the replayed decision or '' x N}}, the
-- fourth flattened. Reasons are REASON_* codes (the tiergate.v1.Reason numbers). The rules and
-- their order are those of `policy::decide` and `rate::govern`. `admit.rs` encodes the arguments
-- and decodes the reply.

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

-- The portfolio's mode: set by UpdatePortfolio, else configured.
local mode = redis.call('HGET', KEYS[5], FIELD_MODE) or ARGV[11]
local throughput_on, default_mps, throughput_burst = ARGV[12] == '1', tonumber(ARGV[13]), tonumber(ARGV[14])
local pair_on, pair_interval, pair_burst = ARGV[15] == '1', tonumber(ARGV[16]), tonumber(ARGV[17])

-- Whether Meta's per-user marketing limit caps marketing to the recipient now.
local function capped(member)
  local until_ = redis.call('ZSCORE', KEYS[7], member)
  return until_ ~= false and tonumber(until_) > now
end

-- What shadow mode admits a message the limit denies as (`policy::admitted_as`).
local function admitted_as(open, member)
  if open then
    return REASON_SERVICE_WINDOW
  elseif w:contact(member) then
    return REASON_ALREADY_COUNTED
  end
  return REASON_NEW_RECIPIENT
end

-- A message's rates (`rate::RateSnapshot`): its number's tat, interval and burst when the
-- throughput rule is on, and its pair's schedule when the pair rule applies (`pair_key`).
local function rates_of(sender, configured, pair_key)
  local r = {}
  if throughput_on then
    local f = redis.call('HMGET', KEYS[5], tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT_TAT),
      tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT), tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT_BACKOFF))
    local mps = configured or tonumber(f[2]) or default_mps
    local backing_off = (tonumber(f[3]) or 0) > now
    r.tat, r.interval = tonumber(f[1]) or 0, tg_throughput_interval(mps, backing_off)
  end
  if pair_on and pair_key then
    r.pair = tg_pair_state(pair_key)
  end
  return r
end

-- Schedules a message at now that may wait up to `max_wait` (`rate::schedule`): nil and the
-- wait when it goes, else the denial and its retry after.
local function schedule(r, max_wait)
  local pair_wait = 0
  if r.pair then
    pair_wait = tg_pair_wait(r.pair, now, pair_interval, pair_burst)
  end
  local throughput_wait = 0
  if r.tat then
    throughput_wait = math.max(r.tat - throughput_burst - (now + pair_wait), 0)
  end
  local total = pair_wait + throughput_wait
  if total <= max_wait then
    return nil, 0, total
  elseif pair_wait > max_wait then
    return REASON_PAIR_RATE, math.max(pair_wait, MIN_RETRY_AFTER)
  end
  return REASON_THROUGHPUT_EXCEEDED, math.max(total, MIN_RETRY_AFTER)
end

-- Takes a message's rate slots at `at` (`rate::take`).
local function take(r, sender, pair_key, at)
  if r.tat then
    local tat = math.max(r.tat, at) + r.interval
    redis.call('HSET', KEYS[5], tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT_TAT), tg_fmt(tat))
  end
  if r.pair then
    tg_set_pair(pair_key, tg_pair_take(r.pair, at, pair_interval), now)
  end
end

w:trim()

for i = 18, #ARGV, 11 do
  local member, service, category = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local template, sender, blocked, language = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local key = ARGV[i + 7] ~= '' and KEYS[tonumber(ARGV[i + 7])]
  local max_wait, configured = tonumber(ARGV[i + 8]), tonumber(ARGV[i + 9])
  local pair_key = ARGV[i + 10] ~= '' and KEYS[tonumber(ARGV[i + 10])]
  local remembered = key and replay(key)
  local open = false
  if service ~= '' and not remembered then
    local closes = redis.call('ZSCORE', KEYS[3], service)
    open = closes ~= false and tonumber(closes) > now
  end
  -- For a denial that waits for the window: the count it must drop below.
  local reason, lease, retry, threshold, wait, shadow = 0, 0, 0, nil, 0, 0
  -- The contact this message wrote, if any.
  local written = nil
  if remembered then
    reason = remembered.reason
    if reason == REASON_NEW_RECIPIENT then
      lease = remembered.score
    end
  else
    -- The messaging-limit rules (`policy::decide`).
    if blocked == '1' or (sender ~= '' and tg_sender_banned(KEYS[5], sender)) then
      reason = REASON_SENDER_BLOCKED
    elseif template ~= '' and not tg_template_sendable(KEYS[5], template, language) then
      reason = REASON_TEMPLATE_BLOCKED
    elseif (not open or MAY_BE_MARKETING[category]) and redis.call('SISMEMBER', KEYS[4], member) == 1 then
      reason = REASON_OPTED_OUT
    elseif MAY_BE_MARKETING[category] and capped(member) then
      reason = REASON_RECIPIENT_MARKETING_CAPPED
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
    end
    -- The rates (`rate::govern`).
    local rates = sender ~= '' and rates_of(sender, configured, pair_key) or {}
    local admitted = ADMITTED[reason] == true
    local slots_at = nil
    if mode == MODE_SHADOW then
      shadow = reason
      if admitted then
        local denial = schedule(rates, max_wait)
        if denial then
          shadow = denial
        end
      else
        reason, threshold = admitted_as(open, member), nil
      end
      slots_at = now
    elseif admitted then
      local denial, denied_retry, paced = schedule(rates, max_wait)
      if denial then
        reason, retry = denial, denied_retry
      else
        wait, slots_at = paced, now + paced
      end
    end
    if slots_at then
      take(rates, sender, pair_key, slots_at)
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
  local next_slot = w:next_slot()
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
  for _, v in ipairs({reason, lease, retry, count, next_slot, wait, shadow}) do
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
