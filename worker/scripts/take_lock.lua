-- Take a credential's single-flight lock and, if taken, read its record in the same step:
-- what a rotation does first, in one round trip instead of two. No other rotation changes
-- the pair while the lock is held; a new grant (a reconnect, an import) may, and the
-- holder's compare-and-swap on the version it read here then refuses its commit.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the credential's record key
-- ARGV[1]  the owner's random token
-- ARGV[2]  the lock's time to live (milliseconds)
-- Returns  {1, record or nil} when taken, {0} when another owner holds the lock.

if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
  return {1, redis.call("GET", KEYS[2])}
end
return {0}
