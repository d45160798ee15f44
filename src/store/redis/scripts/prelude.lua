-- Shared by the scripts (prepended to each but portfolio's, after the constants that
-- scripts/mod.rs generates from Rust: REASON_*, CATEGORY_*, FIELD_*, OP_*, DEADLINE_PASSED, ...).
--
-- Times are microseconds since the Unix epoch, from the Redis server's clock, so sidecars with
-- skewed clocks agree. They stay below 2^53, so Lua's doubles hold them exactly; numbers sent
-- back to Redis go through tg_fmt because Lua's own conversion keeps only 14 digits.

local function tg_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function tg_fmt(n)
  return string.format('%.0f', n)
end

-- The reply of a writing script that started at `now`, after its deadline: every writing script
-- takes one (us, by this clock), the moment its caller gives up less a margin
-- (`store::redis::clock`), and checks it before anything else. Past it, the caller has answered
-- UNAVAILABLE or is about to, so the script writes nothing: a stalled Redis that resumes must not
-- count what was reported failed. The error carries `now` first, so the caller keeps its idea of
-- this clock from refusals too.
local function tg_deadline_passed(now)
  local why = ' the call reached Redis after its deadline; it wrote nothing'
  return redis.error_reply(DEADLINE_PASSED .. ' ' .. tg_fmt(now) .. why)
end

-- The scope's tier (persisted, else the caller's fallback) and the last score handed out.
local function tg_meta(meta_key, fallback_tier, fallback_limit)
  local m = redis.call('HMGET', meta_key, FIELD_TIER, FIELD_LIMIT, FIELD_SEQ)
  local tier, limit = fallback_tier, tonumber(fallback_limit)
  if m[1] then
    tier, limit = m[1], tonumber(m[2])
  end
  return tier, limit, tonumber(m[3]) or 0
end

-- When a reported event happened (`store::event_time`): now when the argument is '', and never
-- later than now, so a reporter's clock ahead of this one cannot date it later.
local function tg_event_time(arg, now)
  if arg == '' then
    return now
  end
  return math.min(tonumber(arg), now)
end

-- The newest (highest) score of a sorted set, or nil when it is empty.
local function tg_newest(key)
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  return newest[2] and tonumber(newest[2])
end

-- A TTL (ms) that keeps a key until `last` (us, by this clock), and one second more. What a key
-- holds can end later than now plus its window: scores move forward past the clock when it
-- steps back or when many Admits land in one microsecond (`policy::next_score`), so every TTL of
-- a key that holds scores is counted from its newest score, never from now.
local function tg_ttl_until(last, now)
  return math.floor(math.max(last - now, 0) / 1000) + 1000
end

-- Keeps a sorted set until its newest score plus `span` (us) has passed.
local function tg_keep_scores(key, span, now)
  local newest = tg_newest(key)
  if newest then
    redis.call('PEXPIRE', key, tg_ttl_until(newest + span, now))
  end
end

-- Keeps a scope's state hash for the state TTL (ms), and at least until the contacts scored up
-- to its last score (`seq`, read when not given) have left the window, so the next score stays
-- above theirs.
local function tg_keep_meta(meta_key, state_ttl, window, now, seq)
  seq = seq or tonumber(redis.call('HGET', meta_key, FIELD_SEQ)) or 0
  redis.call('PEXPIRE', meta_key, math.max(tonumber(state_ttl), tg_ttl_until(seq + window, now)))
end

-- A portfolio hash field: `<kind>:<name>`, or `<kind>:<name>:<attribute>` for senders and templates.
local function tg_field(kind, name, attribute)
  if attribute then
    return kind .. ':' .. name .. ':' .. attribute
  end
  return kind .. ':' .. name
end

-- Whether the sender's last known status is BANNED.
local function tg_sender_banned(portfolio_key, sender)
  return redis.call('HGET', portfolio_key, tg_field(FIELD_SENDER, sender, FIELD_STATUS)) == SENDER_STATUS_BANNED
end

-- Whether a template with this status may be sent (`policy::template_active`): one never heard
-- of (nil) may.
local function tg_template_active(status)
  return not status or ACTIVE_TEMPLATE_STATUSES[status] == true
end

-- A template's last status event in `language` ('' = the one set for every language):
-- {status, at} (at 0 when unknown), or nil.
local function tg_template_event(portfolio_key, template, language)
  local kind, item = FIELD_TEMPLATE, template
  if language ~= '' then
    kind, item = FIELD_TEMPLATE_LANGUAGE, language .. ':' .. template
  end
  local e = redis.call('HMGET', portfolio_key, tg_field(kind, item, FIELD_STATUS), tg_field(kind, item, FIELD_AT))
  if not e[1] then
    return nil
  end
  return {status = e[1], at = tonumber(e[2]) or 0}
end

-- The status in force for one language (`policy::template_status_in_force`): the newer of its
-- own event and the one set for every language; the language's own wins a tie.
local function tg_template_status_in_force(own, every)
  if own and every and every.at > own.at then
    return every.status
  end
  if own then
    return own.status
  end
  return every and every.status
end

-- Whether a message naming `template` in `language` may be sent
-- (`policy::template_language_sendable`); with no language ('') every language must allow it,
-- the name-wide status included (`policy::template_name_sendable`).
local function tg_template_sendable(portfolio_key, template, language)
  local every = tg_template_event(portfolio_key, template, '')
  if language ~= '' then
    return tg_template_active(tg_template_status_in_force(tg_template_event(portfolio_key, template, language), every))
  end
  if not tg_template_active(every and every.status) then
    return false
  end
  local languages = redis.call('HGET', portfolio_key, tg_field(FIELD_TEMPLATE_LANGUAGES, template))
  for l in string.gmatch(languages or '', '[^,]+') do
    local own = tg_template_event(portfolio_key, template, l)
    if not tg_template_active(tg_template_status_in_force(own, every)) then
      return false
    end
  end
  return true
end

-- The spacing (us) of a number's messages at `mps` (`rate::ThroughputRule::interval`): rounded
-- up, so never faster than `mps`, and THROUGHPUT_BACKOFF_FACTOR times that while it backs off.
local function tg_throughput_interval(mps, backing_off)
  mps = math.max(mps, 1)
  local interval = math.floor(1000000 / mps)
  if interval * mps < 1000000 then
    interval = interval + 1
  end
  if backing_off then
    return interval * THROUGHPUT_BACKOFF_FACTOR
  end
  return interval
end

-- A (number, user) pair's schedule (`rate::PairState`) from its key: {tat, burst_start} (us),
-- zero when the key is gone (it expires at its tat, past which the two are the same).
local function tg_pair_state(key)
  local v = redis.call('GET', key)
  local sep = v and string.find(v, ':', 1, true)
  if not sep then
    return {tat = 0, burst_start = 0}
  end
  return {tat = tonumber(string.sub(v, 1, sep - 1)), burst_start = tonumber(string.sub(v, sep + 1))}
end

-- How long a message at `at` waits for its pair (`rate::PairRule::wait`; 0: it may go now).
local function tg_pair_wait(s, at, interval, burst)
  local in_burst = s.burst_start <= at and at < s.burst_start + interval
    and s.tat + interval <= s.burst_start + interval * burst
  if s.tat <= at or in_burst then
    return 0
  end
  return s.tat - at
end

-- The pair's schedule once a message takes its slot at `at` (`rate::PairRule::take`).
local function tg_pair_take(s, at, interval)
  if s.tat <= at then
    return {tat = at + interval, burst_start = at}
  end
  return {tat = s.tat + interval, burst_start = s.burst_start}
end

-- Writes a pair's schedule, kept until its tat (at least a millisecond): after it, the pair owes
-- nothing, as if it had never sent.
local function tg_set_pair(key, s, now)
  local ttl = math.max(math.ceil((s.tat - now) / 1000), 1)
  redis.call('SET', key, tg_fmt(s.tat) .. ':' .. tg_fmt(s.burst_start), 'PX', ttl)
end
