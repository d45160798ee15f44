-- Persists the tier of one limit scope, for every sidecar sharing this Redis.
--
-- KEYS[1]  rolling window, KEYS[2] scope state, KEYS[3] unique recipients today (see admit.lua)
-- ARGV[1]  rolling window (us)
-- ARGV[2]  tier name, ARGV[3] its limit (-1 = unlimited)
-- ARGV[4]  scope state TTL (ms)
--
-- Returns {tier, limit, counted, next slot (us, 0 when nothing is counted)}.

local now = tg_now()
local window = tonumber(ARGV[1])
redis.call('HSET', KEYS[2], 'tier', ARGV[2], 'limit', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local tier, limit, _, day = tg_meta(KEYS[2], ARGV[2], ARGV[3])
tg_expire(KEYS[1], now, window)
local counted, next_slot = tg_usage(limit, KEYS[1], KEYS[3], day, now, window)
return {tier, limit, counted, next_slot}
