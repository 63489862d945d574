-- Compare-and-swap of one credential record, with its due-index entry and the aggregates the
-- status report reads (counts by state, the set of failing credentials), in one atomic step.
--
-- The record is written only if its current version is the expected one: a rotation that
-- used refresh token N commits only while the record still holds token N (the version is
-- bumped whenever the pair changes, and only then).
--
-- KEYS[1]  the credential's record key
-- KEYS[2]  the due index (sorted set: id -> due time)
-- KEYS[3]  the counts by state (hash: state -> count)
-- KEYS[4]  the failing credentials (sorted set: id -> time of the write)
-- ARGV[1]  expected version: "" if the record must not exist, "corrupt" for an unreadable one
-- ARGV[2]  the new record bytes
-- ARGV[3]  the new due time (epoch seconds), or "" to take the credential off the schedule
-- ARGV[4]  the credential id
-- ARGV[5]  now (epoch seconds), the score in the failing set
-- Returns  {1} when written, {0, current version} when the version did not match.

local function header_of(record)
  local newline = string.find(record, "\n", 1, true)
  if not newline then
    return nil
  end
  local ok, header = pcall(cjson.decode, string.sub(record, 1, newline - 1))
  if ok and type(header) == "table" and type(header.v) == "number" then
    return header
  end
  return nil
end

-- A corrupt record's state is unknown: it is neither subtracted nor re-added, and the
-- counts are exact again after `python -m worker status --recount`.
local current = redis.call("GET", KEYS[1])
local version, old_state = "", nil
if current then
  local header = header_of(current)
  if header then
    version, old_state = tostring(header.v), header.st
  else
    version, old_state = "corrupt", "unknown"
  end
end
if version ~= ARGV[1] then
  return {0, version}
end

local new = header_of(ARGV[2])
if not new then
  return redis.error_reply("the new record has no readable header")
end
redis.call("SET", KEYS[1], ARGV[2])
if ARGV[3] == "" then
  redis.call("ZREM", KEYS[2], ARGV[4])
else
  redis.call("ZADD", KEYS[2], ARGV[3], ARGV[4])
end
if old_state ~= new.st and old_state ~= "unknown" then
  if old_state then
    redis.call("HINCRBY", KEYS[3], old_state, -1)
  end
  redis.call("HINCRBY", KEYS[3], new.st, 1)
end
if new.st ~= "active" or (new.fc or 0) > 0 then
  redis.call("ZADD", KEYS[4], ARGV[5], ARGV[4])
else
  redis.call("ZREM", KEYS[4], ARGV[4])
end
return {1}
