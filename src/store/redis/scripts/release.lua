-- Gives back the slot one Admit counted, if that Admit is still the recipient's latest contact.
--
-- KEYS[1]  rolling window (see admit.lua)
-- ARGV[1]  recipient hash
-- ARGV[2]  the lease's score (us): unique within the scope, so it names exactly one Admit
-- ARGV[3]  deadline (us, by this clock): started later, the script writes nothing and answers
--          the DEADLINE_PASSED error with now (see tg_deadline_passed)
--
-- Returns {1 when the contact was removed, 0 when it was already gone or touched again since,
-- now (us)}. `release.rs` encodes the arguments and decodes the reply.

local now = tg_now()
if now > tonumber(ARGV[3]) then
  return tg_deadline_passed(now)
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {1, now}
end
return {0, now}
