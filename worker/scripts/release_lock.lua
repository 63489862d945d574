-- Let go of a lock, if its owner is still the caller: a lock whose TTL ran out may have been
-- taken by another rotation since, and that one must keep it.
--
-- KEYS[1]  the lock key
-- ARGV[1]  the owner's token
-- Returns  1 when released, 0 when the caller no longer owned it.

if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("DEL", KEYS[1])
  return 1
end
return 0
