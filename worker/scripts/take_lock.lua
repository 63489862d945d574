-- Take a credential's single-flight lock and, if taken, read its record in the same step:
-- what a rotation does first, in one round trip instead of two. Read under the lock, the
-- record's pair cannot change before the holder commits or lets go.
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
