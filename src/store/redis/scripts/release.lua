-- Gives back the slot one Admit counted, if that Admit is still the recipient's latest contact.
--
-- KEYS[1]  rolling window: hash of buckets and time-log chunks (layout at the top of window.lua;
--          see admit.lua)
-- KEYS[2]  the window as the previous version kept it (sorted set; see window.lua)
-- ARGV[1]  recipient hash
-- ARGV[2]  the lease's score (us): unique within the scope, so it names exactly one Admit
-- ARGV[3]  deadline (us, by this clock): started later, the script writes nothing and answers
--          the DEADLINE_PASSED error with now (see tg_deadline_passed)
--
-- Like the other stores, it drops nothing that left the window: a contact that has left but was
-- not dropped yet is still the recipient's, and can be given back. Cost: one bucket, and the
-- contact's chunk (a binary search over the chunks' bases).
--
-- Returns {1 when the contact was removed, 0 when it was already gone or touched again since,
-- now (us)}. `release.rs` encodes the arguments and decodes the reply.

local now = tg_now()
if now > tonumber(ARGV[3]) then
  return tg_deadline_passed(now)
end
local w = tg_window(KEYS[1], KEYS[2], now, 0, nil)
local removed = w:remove(ARGV[1], tonumber(ARGV[2]))
w:flush()
if removed then
  return {1, now}
end
return {0, now}
