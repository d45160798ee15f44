-- The usage of one limit scope, after dropping contacts that left the window.
--
-- KEYS[1]  rolling window, KEYS[2] scope state, KEYS[3] unique recipients today (see admit.lua)
-- ARGV[1]  rolling window (us)
-- ARGV[2]  fallback tier name, ARGV[3] its limit (-1 = unlimited), used when none is persisted
--
-- Returns {tier, limit, counted, next slot (us, 0 when nothing is counted)}.

local now = tg_now()
local window = tonumber(ARGV[1])
local tier, limit, _, day = tg_meta(KEYS[2], ARGV[2], ARGV[3])
tg_expire(KEYS[1], now, window)
local counted, next_slot = tg_usage(limit, KEYS[1], KEYS[3], day, now, window)
return {tier, limit, counted, next_slot}
