-- Opens or restarts the customer service window of one (sender, recipient) pair.
--
-- KEYS[1]  service windows of the portfolio: sorted set, member = (sender, recipient) hash,
--          score = closing time (us)
-- ARGV[1]  (sender, recipient) hash
-- ARGV[2]  service window length (us)
--
-- Returns the closing time (us).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local closes = now + tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
redis.call('ZADD', KEYS[1], string.format('%.0f', closes), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[2]) / 1000) + 1000)
return closes
