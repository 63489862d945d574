-- A shared rate limit (GCRA): reserve the next slot for one call and say how long to wait.
--
-- Every worker on every host reserves from the same key, so together they never exceed
-- the rate, with bursts of up to ARGV[2] calls. Time comes from Redis, not from the hosts.
--
-- KEYS[1]  the limiter's key (holds the theoretical arrival time of the next call)
-- ARGV[1]  calls per second
-- ARGV[2]  burst: calls allowed at once
-- ARGV[3]  the longest wait the caller accepts; beyond it nothing is reserved
-- Returns  the seconds to wait before calling, as a string; "-1" if over ARGV[3]

redis.replicate_commands()
local time = redis.call("TIME")
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local interval = 1 / tonumber(ARGV[1])
local next_at = tonumber(redis.call("GET", KEYS[1]) or "0")
if next_at < now then
  next_at = now
end
local wait = next_at - now - (tonumber(ARGV[2]) - 1) * interval
if wait < 0 then
  wait = 0
end
if wait > tonumber(ARGV[3]) then
  return "-1"
end
next_at = next_at + interval
redis.call("SET", KEYS[1], string.format("%.6f", next_at), "PX", math.ceil((next_at - now) * 1000) + 1000)
return string.format("%.6f", wait)
