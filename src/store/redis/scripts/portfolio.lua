-- Everything persisted about one portfolio besides its windows.
--
-- KEYS[1]  portfolio state hash (see apply.lua), KEYS[2] opted-out recipients (set)
--
-- Returns {flattened HGETALL of KEYS[1], SCARD of KEYS[2]}; `portfolio.rs` reads the field names.

return {redis.call('HGETALL', KEYS[1]), redis.call('SCARD', KEYS[2])}
