-- Compare-and-swap of one credential record and its due-index entry, in one atomic step.
--
-- The record is written only if its current version is the expected one: a rotation that
-- used refresh token N commits only while the record still holds token N (the version is
-- bumped whenever the pair changes, and only then).
--
-- KEYS[1]  the credential's record key
-- KEYS[2]  the due index (sorted set)
-- ARGV[1]  expected version: "" if the record must not exist, "corrupt" for an unreadable one
-- ARGV[2]  the new record bytes
-- ARGV[3]  the new due time (epoch seconds), or "" to take the credential off the schedule
-- ARGV[4]  the credential id (the due index member)
-- Returns  {1} when written, {0, current version} when the version did not match.

local current = redis.call("GET", KEYS[1])
local version = ""
if current then
  version = "corrupt"
  local newline = string.find(current, "\n", 1, true)
  if newline then
    local ok, header = pcall(cjson.decode, string.sub(current, 1, newline - 1))
    if ok and type(header) == "table" and type(header.v) == "number" then
      version = tostring(header.v)
    end
  end
end
if version ~= ARGV[1] then
  return {0, version}
end
redis.call("SET", KEYS[1], ARGV[2])
if ARGV[3] == "" then
  redis.call("ZREM", KEYS[2], ARGV[4])
else
  redis.call("ZADD", KEYS[2], ARGV[3], ARGV[4])
end
return {1}
