-- Let go of a lock, if its owner is still the caller: a lock whose TTL ran out may have been
-- taken by another rotation since, and that one must keep it. A rotation that did not call
-- Miro after all (the credential was fresh, rotated by another request, paused) gives back
-- the slot it reserved with the lock (take_lock.lua): the rate limit's next arrival time
-- moves back by one slot, never before now. The slot arithmetic mirrors take_lock.lua's
-- (scripts cannot share code).
--
-- KEYS[1]  the lock key
-- KEYS[2]  the rate limit's key, to give a slot back; optional
-- ARGV[1]  the owner's token
-- ARGV[2]  one slot's length in seconds (1 / the rate), with KEYS[2]
-- Returns  1 when released, 0 when the caller no longer owned it.

redis.replicate_commands()

local function give_back_slot(key, interval)
  local time = redis.call("TIME")
  local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
  local next_at = tonumber(redis.call("GET", key) or "0") - interval
  if next_at > now then
    -- pcall: a slot Redis will not take back (OOM) is only a slot lost, not a failed release
    redis.pcall("SET", key, string.format("%.6f", next_at), "PX", math.ceil((next_at - now) * 1000) + 1000)
  else
    redis.call("DEL", key)
  end
end

-- The lock first: under maxmemory (OOM) Redis refuses a script's first write unless it frees
-- memory, and a DEL does. The slot goes back only with a lock still ours, so a retried call
-- (its first reply lost) gives nothing back twice.
if redis.call("GET", KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call("DEL", KEYS[1])
if KEYS[2] then
  give_back_slot(KEYS[2], tonumber(ARGV[2]))
end
return 1
