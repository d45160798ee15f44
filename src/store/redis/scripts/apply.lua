-- Applies a list of changes to one portfolio's persisted state, atomically and idempotently.
--
-- KEYS[1]  portfolio state: hash (field names: FIELD_* in the prelude, generated from Rust)
--            q                  the portfolio's quality
--            s:<sender>:status  number status; s:<sender>:since when it last changed (us)
--            s:<sender>:quality number quality
--            s:<sender>:mps     number throughput level (messages per second)
--            s:<sender>:bo      until when the number's throughput is reduced (us)
--            s:<sender>:tat     the number's throughput schedule (us), also taken by Admit
--            mode               the mode set by UpdatePortfolio (MODE_*; absent: configured)
--            t:<name>:status    template status event set for every language of the name;
--                               t:<name>:quality its quality
--            tl:<language>:<name>:status   template status event in one language;
--                               tl:<language>:<name>:quality its quality (a language is
--                               [A-Za-z0-9_-], so the first ':' ends it; a name may hold ':')
--            tls:<name>         the name's languages with a status of their own, comma-separated
--            a:<key>            account alert body
--            n:<display number> phone number id
-- KEYS[2]  opted-out recipients: set of recipient hashes
-- KEYS[3]  service windows: sorted set, member = (sender, recipient) hash, score = closing time
-- KEYS[4]  recipients Meta's per-user marketing limit capped: sorted set, member = recipient
--          hash, score = until when (us)
-- KEYS[5..] scope state hashes that tier/elig/flag changes name by index (see admit.lua)
-- KEYS[5..] also pair schedules (strings, see admit.lua) that pbo names by index, and the windows (hashes, layout at the top of window.lua), the windows as the previous
--          version kept them (sorted sets), delivered sets and daily HyperLogLogs that deliveries
--          name by index
-- ARGV[1]  state TTL (ms), ARGV[2] service window (us), ARGV[3] rolling window (us),
-- ARGV[4]  TTL of a daily HyperLogLog (ms)
-- ARGV[5]  deadline (us, by this clock): started later, the script writes nothing and answers
--          the DEADLINE_PASSED error with now (see tg_deadline_passed)
-- ARGV[6..] changes, each an op name (OP_* in the prelude) and its arguments:
--   tier <key index> <name> <limit> <at>  sets the tier; `since` moves to now when the name changes
--   (for tier, sst, tst and tlst, <at> is when the event happened, '' = now; an event older than
--   the last one applied to the same item is skipped: its time is kept in `tat`, s:<sender>:at,
--   t:<name>:at or tl:<language>:<name>:at)
--   elig <key index> <us or ''>          flag <key index> <us or ''>
--   q <quality>    sst <sender> <status> <at>    sq <sender> <quality>
--   tst <template> <status> <at>    tq <template> <quality>
--   opt <recipient hash> <1 or 0>    alert <key> <body>    alias <display> <id>
--   in <service-window hash> <us or ''>   opens the window until min(then, now) + service window
--   tp <sender> <messages per second>     the number's throughput level
--   dlv <window> <legacy window> <delivered> <day-1> <day> <day+1> <day number> <recipient hash>
--     <d|f> <at>
--     a delivery status (`policy::Delivery`): the first six are key indices (the scope's
--     window, its legacy window, its delivered set, and the daily HyperLogLogs around the
--     caller's day); `d`
--     confirms the recipient (into that day's count when counted in the window), `f` gives its
--     slot back as `policy::failure_gives_back` says
--   tlst <template> <language> <status> <at>    tlq <template> <language> <quality>
--   trf <sender> <configured mps or ''> <default mps> <at>   a message outside Admit takes a slot
--     of the number's throughput at <at> (`rate::throughput_take`)
--   tbo <sender> <at>    the number's throughput is reduced until <at> + THROUGHPUT_BACKOFF
--   pbo <key index> <interval us> <at>   Meta refused the pair at <at> (`rate::PairRule::penalise`)
--   mc <recipient hash> <at>   no marketing to the recipient until <at> + MARKETING_CAPPED_FOR
--   mode <enforce, shadow or ''>   the portfolio's mode ('' = back to the configured one)
--   (for in, dlv, trf, tbo, pbo and mc, <at> '' is now, and a time later than now is now)
--   (tst and tq set the name in every language; which status is in force for a language is
--   `policy::template_status_in_force`, read by the admit script)
--
-- Returns the server's time (us). `apply.rs` encodes the arguments and decodes the reply.

local now = tg_now()
if now > tonumber(ARGV[5]) then
  return tg_deadline_passed(now)
end
local ttl = ARGV[1]
local service_window = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local touched = {}
-- The windows deliveries read, opened once each (and trimmed once: `now` is the same).
local windows = {}
local function window_of(key, legacy)
  if not windows[key] then
    windows[key] = tg_window(key, legacy, now, window, nil)
    windows[key]:trim()
  end
  return windows[key]
end

-- The delivered sets deliveries write, each trimmed once (`now` is the same for every change):
-- key -> {recipient hash -> the latest confirmation of this call}, written at the end (ZADD GT).
-- What one call writes is read back from here, so a failure after a confirmation in the same call
-- sees it. A confirmation at or before the window's start is not kept: the sorted set is trimmed
-- to the window, and a failure reads only confirmations inside it.
local delivered_sets = {}
local function delivered_of(key, start)
  local confirmed = delivered_sets[key]
  if not confirmed then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', tg_fmt(start))
    confirmed = {}
    delivered_sets[key] = confirmed
  end
  return confirmed
end
-- The daily HyperLogLogs deliveries add to: key -> recipient hashes, added in one PFADD at the
-- end (a HyperLogLog does not depend on the order of what it is given).
local days = {}

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

local i = 6
while i <= #ARGV do
  local op = ARGV[i]
  if op == OP_TIER then
    local key = KEYS[tonumber(ARGV[i + 1])]
    if newer(key, FIELD_TIER_AT, ARGV[i + 4]) then
      if redis.call('HGET', key, FIELD_TIER) ~= ARGV[i + 2] then
        redis.call('HSET', key, FIELD_SINCE, tg_fmt(now))
      end
      redis.call('HSET', key, FIELD_TIER, ARGV[i + 2], FIELD_LIMIT, ARGV[i + 3])
    end
    touched[key] = true
    i = i + 5
  elseif op == OP_ELIGIBLE or op == OP_FLAGGED then
    local key = KEYS[tonumber(ARGV[i + 1])]
    set_or_clear(key, ({[OP_ELIGIBLE] = FIELD_ELIGIBLE, [OP_FLAGGED] = FIELD_FLAGGED})[op], ARGV[i + 2])
    touched[key] = true
    i = i + 3
  elseif op == OP_QUALITY then
    redis.call('HSET', KEYS[1], FIELD_QUALITY, ARGV[i + 1])
    i = i + 2
  elseif op == OP_SENDER_STATUS then
    local sender = ARGV[i + 1]
    if newer(KEYS[1], tg_field(FIELD_SENDER, sender, FIELD_AT), ARGV[i + 3]) then
      local status = tg_field(FIELD_SENDER, sender, FIELD_STATUS)
      if redis.call('HGET', KEYS[1], status) ~= ARGV[i + 2] then
        redis.call('HSET', KEYS[1], tg_field(FIELD_SENDER, sender, FIELD_SINCE), tg_fmt(now))
      end
      redis.call('HSET', KEYS[1], status, ARGV[i + 2])
    end
    i = i + 4
  elseif op == OP_SENDER_QUALITY then
    redis.call('HSET', KEYS[1], tg_field(FIELD_SENDER, ARGV[i + 1], FIELD_ITEM_QUALITY), ARGV[i + 2])
    i = i + 3
  elseif op == OP_TEMPLATE_STATUS then
    local template = ARGV[i + 1]
    if newer(KEYS[1], tg_field(FIELD_TEMPLATE, template, FIELD_AT), ARGV[i + 3]) then
      redis.call('HSET', KEYS[1], tg_field(FIELD_TEMPLATE, template, FIELD_STATUS), ARGV[i + 2])
    end
    i = i + 4
  elseif op == OP_TEMPLATE_QUALITY then
    redis.call('HSET', KEYS[1], tg_field(FIELD_TEMPLATE, ARGV[i + 1], FIELD_ITEM_QUALITY), ARGV[i + 2])
    i = i + 3
  elseif op == OP_OPT_OUT then
    if ARGV[i + 2] == '1' then
      redis.call('SADD', KEYS[2], ARGV[i + 1])
    else
      redis.call('SREM', KEYS[2], ARGV[i + 1])
    end
    i = i + 3
  elseif op == OP_ALERT then
    redis.call('HSET', KEYS[1], tg_field(FIELD_ALERT, ARGV[i + 1]), ARGV[i + 2])
    i = i + 3
  elseif op == OP_ALIAS then
    redis.call('HSET', KEYS[1], tg_field(FIELD_ALIAS, ARGV[i + 1]), ARGV[i + 2])
    i = i + 3
  elseif op == OP_INBOUND then
    -- A timestamp ahead of this clock cannot hold a window open longer than one from now.
    local at = tg_event_time(ARGV[i + 2], now)
    redis.call('ZADD', KEYS[3], 'GT', tg_fmt(at + service_window), ARGV[i + 1])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tg_fmt(now))
    -- Until the last window closes, which may be later than one from now (opened before this
    -- clock stepped back).
    tg_keep_scores(KEYS[3], 0, now)
    i = i + 3
  elseif op == OP_DELIVERY then
    local w = window_of(KEYS[tonumber(ARGV[i + 1])], KEYS[tonumber(ARGV[i + 2])])
    local delivered_key = KEYS[tonumber(ARGV[i + 3])]
    local member, status = ARGV[i + 8], ARGV[i + 9]
    local at = tg_event_time(ARGV[i + 10], now)
    local start = now - window
    local confirmed = delivered_of(delivered_key, start)
    local contact = w:contact(member)
    if status == 'd' then
      -- A confirmation already outside the window is read by nothing (see `delivered_of`).
      if at > start and at > (confirmed[member] or 0) then
        confirmed[member] = at
      end
      if contact then
        -- The day of the delivery by this clock, among the three keys around the caller's.
        local offset = math.floor(at / DAY_US) - tonumber(ARGV[i + 7])
        local day = KEYS[tonumber(ARGV[i + 5])]
        if offset >= -1 and offset <= 1 then
          day = KEYS[tonumber(ARGV[i + 5 + offset])]
        end
        local members = days[day]
        if not members then
          members = {}
          days[day] = members
        end
        members[#members + 1] = member
      end
    else
      local delivered = confirmed[member] or tonumber(redis.call('ZSCORE', delivered_key, member))
      local delivered_in_window = delivered and delivered > start
      if contact and contact <= at and not delivered_in_window then
        w:remove(member, nil)
      end
    end
    i = i + 11
  elseif op == OP_THROUGHPUT then
    redis.call('HSET', KEYS[1], tg_field(FIELD_SENDER, ARGV[i + 1], FIELD_THROUGHPUT), ARGV[i + 2])
    i = i + 3
  elseif op == OP_TEMPLATE_LANGUAGE_STATUS then
    local template, language = ARGV[i + 1], ARGV[i + 2]
    local item = language .. ':' .. template
    if newer(KEYS[1], tg_field(FIELD_TEMPLATE_LANGUAGE, item, FIELD_AT), ARGV[i + 4]) then
      redis.call('HSET', KEYS[1], tg_field(FIELD_TEMPLATE_LANGUAGE, item, FIELD_STATUS), ARGV[i + 3])
      local list = tg_field(FIELD_TEMPLATE_LANGUAGES, template)
      local languages = redis.call('HGET', KEYS[1], list)
      if not languages then
        redis.call('HSET', KEYS[1], list, language)
      elseif not string.find(',' .. languages .. ',', ',' .. language .. ',', 1, true) then
        redis.call('HSET', KEYS[1], list, languages .. ',' .. language)
      end
    end
    i = i + 5
  elseif op == OP_TRAFFIC then
    local sender = ARGV[i + 1]
    local f = redis.call('HMGET', KEYS[1], tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT_TAT),
      tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT), tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT_BACKOFF))
    local mps = tonumber(ARGV[i + 2]) or tonumber(f[2]) or tonumber(ARGV[i + 3])
    local interval = tg_throughput_interval(mps, (tonumber(f[3]) or 0) > now)
    local tat = math.max(tonumber(f[1]) or 0, tg_event_time(ARGV[i + 4], now)) + interval
    redis.call('HSET', KEYS[1], tg_field(FIELD_SENDER, sender, FIELD_THROUGHPUT_TAT), tg_fmt(tat))
    i = i + 5
  elseif op == OP_THROUGHPUT_BACKOFF then
    local field = tg_field(FIELD_SENDER, ARGV[i + 1], FIELD_THROUGHPUT_BACKOFF)
    local until_ = tg_event_time(ARGV[i + 2], now) + THROUGHPUT_BACKOFF
    redis.call('HSET', KEYS[1], field, tg_fmt(math.max(tonumber(redis.call('HGET', KEYS[1], field)) or 0, until_)))
    i = i + 3
  elseif op == OP_PAIR_BACKOFF then
    -- `rate::PairRule::penalise`: nothing more until an interval after <at>, and no burst before.
    local key = KEYS[tonumber(ARGV[i + 1])]
    local s = tg_pair_state(key)
    local tat = math.max(s.tat, tg_event_time(ARGV[i + 3], now) + tonumber(ARGV[i + 2]))
    tg_set_pair(key, {tat = tat, burst_start = tat}, now)
    i = i + 4
  elseif op == OP_MARKETING_CAPPED then
    local until_ = tg_event_time(ARGV[i + 2], now) + MARKETING_CAPPED_FOR
    redis.call('ZADD', KEYS[4], 'GT', tg_fmt(until_), ARGV[i + 1])
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tg_fmt(now))
    tg_keep_scores(KEYS[4], 0, now)
    i = i + 3
  elseif op == OP_MODE then
    set_or_clear(KEYS[1], FIELD_MODE, ARGV[i + 1])
    i = i + 2
  elseif op == OP_TEMPLATE_LANGUAGE_QUALITY then
    local item = ARGV[i + 2] .. ':' .. ARGV[i + 1]
    redis.call('HSET', KEYS[1], tg_field(FIELD_TEMPLATE_LANGUAGE, item, FIELD_ITEM_QUALITY), ARGV[i + 3])
    i = i + 4
  else
    return redis.error_reply('unknown change ' .. tostring(op))
  end
end

redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
for key in pairs(touched) do
  tg_keep_meta(key, ttl, window, now)
end
for key, confirmed in pairs(delivered_sets) do
  local args = {}
  for member, at in pairs(confirmed) do
    args[#args + 1] = tg_fmt(at)
    args[#args + 1] = member
  end
  for j = 1, #args, 200 do
    redis.call('ZADD', key, 'GT', unpack(args, j, math.min(j + 199, #args)))
  end
  if #args > 0 then
    tg_keep_scores(key, window, now)
  end
end
for key, members in pairs(days) do
  for j = 1, #members, 200 do
    redis.call('PFADD', key, unpack(members, j, math.min(j + 199, #members)))
  end
  redis.call('PEXPIRE', key, ARGV[4])
end
for _, w in pairs(windows) do
  w:flush()
end
return now
