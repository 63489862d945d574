-- Replace a record only if it is still byte for byte what the caller read.
-- Used to re-encrypt under a new key: it never overwrites a rotation that landed meanwhile.
--
-- KEYS[1]  the credential's record key
-- ARGV[1]  the bytes the caller read
-- ARGV[2]  the replacement
-- Returns  1 when replaced, 0 otherwise.

if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("SET", KEYS[1], ARGV[2])
  return 1
end
return 0
