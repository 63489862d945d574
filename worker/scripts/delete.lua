-- Delete one credential with its due-index entry, its share of the aggregates and its place
-- in the id index (id_index.lua).
--
-- KEYS[1]     the credential's record key
-- KEYS[2..4]  the due index, the counts by state, the failing set (as in write_if_version.lua)
-- KEYS[5..7]  its team's id set, its user's bucket of the id index, the buckets in use
-- ARGV[1]     the credential id
-- ARGV[2]     its user's bucket number in the id index
-- Returns     1 if a record was deleted, 0 if there was none.

-- include: id_index

unindex_id(KEYS[5], KEYS[6], KEYS[7], ARGV[1], ARGV[2])
redis.call("ZREM", KEYS[2], ARGV[1])
redis.call("ZREM", KEYS[4], ARGV[1])
local current = redis.call("GET", KEYS[1])
if not current then
  return 0
end
-- A corrupt record's state is unknown: its count is left for `status --recount` to fix.
local state = nil
local newline = string.find(current, "\n", 1, true)
if newline then
  local ok, header = pcall(cjson.decode, string.sub(current, 1, newline - 1))
  if ok and type(header) == "table" and type(header.st) == "string" then
    state = header.st
  end
end
redis.call("DEL", KEYS[1])
if state then
  redis.call("HINCRBY", KEYS[3], state, -1)
end
return 1
