-- The usage of one limit scope, after dropping contacts that left the window.
--
-- KEYS[1]  rolling window, KEYS[2] scope state (see admit.lua)
-- KEYS[3..] daily HyperLogLogs of recipients reached, today first, then one per earlier day
-- ARGV[1]  rolling window (us)
-- ARGV[2]  fallback tier name, ARGV[3] its limit (-1 = unlimited), used when none is persisted
--
-- Returns {tier, limit, counted, next slot (us), unique over 7 days, unique over #KEYS-2 days,
-- tier since, eligible since, flagged since, now}; absent times are 0.

local now = tg_now()
local window = tonumber(ARGV[1])
local tier, limit = tg_meta(KEYS[2], ARGV[2], ARGV[3])
tg_expire(KEYS[1], now, window)
local counted, next_slot = tg_usage(limit, KEYS[1], KEYS[3], window)
local week = {}
for i = 3, math.min(9, #KEYS) do
  week[#week + 1] = KEYS[i]
end
local all = {}
for i = 3, #KEYS do
  all[#all + 1] = KEYS[i]
end
local u7 = redis.call('PFCOUNT', unpack(week))
local u30 = redis.call('PFCOUNT', unpack(all))
local m = redis.call('HMGET', KEYS[2], 'since', 'elig', 'flag')
return {tier, limit, counted, next_slot, u7, u30,
  tonumber(m[1]) or 0, tonumber(m[2]) or 0, tonumber(m[3]) or 0, now}
