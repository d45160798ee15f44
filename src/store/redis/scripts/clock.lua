-- Reads the clock of the server that holds KEYS[1] (which it does not touch), so a store that
-- knows nothing of that clock yet can give a writing script its deadline in it.
--
-- KEYS[1]  any key of the slot the next call runs on
--
-- Returns the server's time (us). `clock.rs` encodes the arguments and decodes the reply.

return tg_now()
