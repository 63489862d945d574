-- Hold every worker's calls to Miro's token endpoint back until ARGV[1]: Miro answered 429
-- and named when its limit resets. A hold already running longer is kept: two workers told
-- at once must not shorten each other's hold. take_lock.lua hands out no slot before it ends.
--
-- KEYS[1]  the hold (an epoch second, as a string)
-- ARGV[1]  the hold's end (epoch seconds)
-- ARGV[2]  how long the key is kept (milliseconds): until the end, and a little more
-- Returns  1 when the hold was set or extended, 0 when a longer one was in force.

if tonumber(ARGV[1]) <= tonumber(redis.call("GET", KEYS[1]) or "0") then
  return 0
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return 1
