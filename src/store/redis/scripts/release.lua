-- Gives back the slot one Admit counted, if that Admit is still the recipient's latest contact.
--
-- KEYS[1]  rolling window (see admit.lua)
-- ARGV[1]  recipient hash
-- ARGV[2]  the lease's score (us): unique within the scope, so it names exactly one Admit
--
-- Returns 1 when the contact was removed, 0 when it was already gone or touched again since.
-- `release.rs` encodes the arguments and decodes the reply.

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
