-- Claim the credentials that are due: take up to ARGV[3] of them and push each one's due
-- time forward by the lease, in one atomic step. A second beat, a slow tick or a retried
-- tick therefore never claims a credential twice; a claim whose task never ran comes due
-- again when its lease runs out. Cost: O(log N + claimed), whatever N is.
--
-- KEYS[1]  the due index (sorted set: id -> due time)
-- ARGV[1]  now (epoch seconds)
-- ARGV[2]  the end of the lease (epoch seconds)
-- ARGV[3]  the most to claim
-- Returns  the claimed ids

local ids = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1], "LIMIT", 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call("ZADD", KEYS[1], "XX", ARGV[2], id)
end
return ids
