-- The usage of one limit scope, after dropping contacts that left the window.
--
-- KEYS[1]  rolling window: hash of buckets and time-log chunks (layout at the top of window.lua;
--          see admit.lua)
-- KEYS[2]  scope state (see admit.lua)
-- KEYS[3]  the window as the previous version kept it (sorted set; see window.lua)
-- KEYS[4..35] daily HyperLogLogs of recipients reached, from the day after ARGV[4] back to 30
--          days before it; the script counts from whichever is today by the Redis clock
-- ARGV[1]  rolling window (us)
-- ARGV[2]  fallback tier name, ARGV[3] its limit (-1 = unlimited), used when none is persisted
-- ARGV[4]  the caller's day (days since the Unix epoch, UTC)
--
-- Returns {tier, limit, counted, next slot (us), unique over 7 days, unique over 30 days,
-- tier since, eligible since, flagged since, now}; absent times are 0. `usage.rs` encodes the
-- arguments and decodes the reply.

local DAYS_FROM = 4

local now = tg_now()
local window = tonumber(ARGV[1])
local tier, limit = tg_meta(KEYS[2], ARGV[2], ARGV[3])
-- Counted recipients and when the oldest leaves the window (0: none), on every tier.
local w = tg_window(KEYS[1], KEYS[3], now, window, nil)
w:trim()
local counted = w:count()
local next_slot = w:next_slot()
w:flush()
-- KEYS[DAYS_FROM] is the day after the caller's; today by this clock is `first`.
local first = DAYS_FROM + 1 + tonumber(ARGV[4]) - math.floor(now / DAY_US)
if first < DAYS_FROM or first + 29 > #KEYS then
  first = DAYS_FROM + 1
end
local week = {}
for i = first, first + 6 do
  week[#week + 1] = KEYS[i]
end
local all = {}
for i = first, first + 29 do
  all[#all + 1] = KEYS[i]
end
local u7 = redis.call('PFCOUNT', unpack(week))
local u30 = redis.call('PFCOUNT', unpack(all))
local m = redis.call('HMGET', KEYS[2], FIELD_SINCE, FIELD_ELIGIBLE, FIELD_FLAGGED)
return {tier, limit, counted, next_slot, u7, u30,
  tonumber(m[1]) or 0, tonumber(m[2]) or 0, tonumber(m[3]) or 0, now}
