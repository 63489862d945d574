-- Everything a rotation does before it calls Miro, in one round trip: take the credential's
-- single-flight lock, read its record, hide it from the scan while the lock lives, and reserve
-- a slot at Miro's token endpoint.
--
-- No other rotation changes the pair while the lock is held; a new grant (a reconnect, an
-- import) may, and the holder's compare-and-swap on the version it read here then refuses
-- its commit.
--
-- The slot comes from a rate limit (GCRA) shared by every worker on every host: together
-- they never exceed the rate, with bursts of up to ARGV[6] calls. Time comes from Redis, not
-- from the hosts. A slot is reserved only with the lock; a rotation that then finds nothing
-- to do gives it back when it lets go of the lock (release_lock.lua). Once Miro has answered
-- 429, no slot falls before the end of the hold it announced (KEYS[5]): every worker holds
-- back, not only the one that was told.
--
-- A rotation ends by writing its credential's due time. Until then its due time is pushed to
-- the end of the lock (never pulled in): a scan does not hand out a credential whose rotation
-- is running, and the credential of a rotation that died comes back when its lock runs out.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the credential's record key
-- KEYS[3]  the due index (sorted set: id -> due time)          } optional: for a rotation,
-- KEYS[4]  the rate limit's key (the theoretical arrival time  } which will call Miro
--          of the next call)                                   }
-- KEYS[5]  the hold Miro's 429 put on every call (an epoch)    }
-- ARGV[1]  the owner's random token
-- ARGV[2]  the lock's time to live (milliseconds); with a slot to wait for, from the slot on
-- ARGV[3]  the credential id (its member in the due index)     } with KEYS[3..5]
-- ARGV[4]  now (epoch seconds, the clock of the due index)     }
-- ARGV[5]  calls per second                                    }
-- ARGV[6]  burst: calls allowed at once                        }
-- ARGV[7]  the longest wait the caller takes                   } beyond it nothing is reserved
-- Returns  {0} when another owner holds the lock; else {1, record or nil} and, for a
--          rotation, the seconds to wait for the slot as a string, "-1" if it is over
--          ARGV[7] away, then, when that is because of Miro's hold, the hold's end.

redis.replicate_commands()

-- The slot's wait, and the hold's end when the hold is what keeps it over max_wait away.
local function reserve_slot(key, hold_key, rate, burst, max_wait)
  local time = redis.call("TIME")
  local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
  local held_until = tonumber(redis.call("GET", hold_key) or "0")
  if held_until - now > max_wait then
    return "-1", string.format("%.6f", held_until)
  end
  local interval = 1 / rate
  local next_at = math.max(tonumber(redis.call("GET", key) or "0"), now, held_until)
  local wait = math.max(0, next_at - now - (burst - 1) * interval, held_until - now)
  if wait > max_wait then
    return "-1"
  end
  next_at = next_at + interval
  redis.call("SET", key, string.format("%.6f", next_at), "PX", math.ceil((next_at - now) * 1000) + 1000)
  return string.format("%.6f", wait)
end

-- Checked before anything is written: a script that fails half-way is not undone, and a
-- lock taken by a call that then errs would stay until its TTL.
local rotation = KEYS[3] ~= nil
if rotation and not ((tonumber(ARGV[5]) or 0) > 0) then
  return redis.error_reply("the rate must be a number of calls per second above 0")
end

-- Already ours: this call repeats one that took the lock and whose reply was lost. The
-- lock then lives its whole time to live from now, as if taken now: the work it guards
-- starts now.
local ours = redis.call("GET", KEYS[1]) == ARGV[1]
if ours then
  redis.call("PEXPIRE", KEYS[1], ARGV[2])
elseif not redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
  return {0}
end
local record = redis.call("GET", KEYS[2]) -- false, not nil, when absent: the list goes on
if not rotation then
  return {1, record}
end
local rate, burst, max_wait = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local slot, held_until = reserve_slot(KEYS[4], KEYS[5], rate, burst, max_wait)
-- The time to live covers the call to Miro and the commit's retries; the wait comes first.
local ttl = tonumber(ARGV[2]) + math.ceil(math.max(0, tonumber(slot)) * 1000)
if ttl > tonumber(ARGV[2]) then
  redis.call("PEXPIRE", KEYS[1], ttl)
end
redis.call("ZADD", KEYS[3], "XX", "GT", tonumber(ARGV[4]) + ttl / 1000, ARGV[3])
if held_until then
  return {1, record, slot, held_until}
end
return {1, record, slot}
