-- Records the deployment's shared policy if none is (always when replacing), and returns it.
--
-- KEYS[1]  shared policy: string (see `shared_policy.rs` in the crate root); it never expires
-- ARGV[1]  this sidecar's policy
-- ARGV[2]  '1' to replace what is recorded
--
-- Returns the policy recorded after the call. `shared_policy.rs` here encodes the arguments and
-- decodes the reply.

if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
local recorded = redis.call('GET', KEYS[1])
if recorded then
  return recorded
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
