-- One page of the id index's user buckets read in turn: the console's list of every
-- credential. The caller names the buckets in use from the cursor's on (from the bitmap), at
-- least as many as the page has rows, since each holds one member or more.
--
-- KEYS     the buckets, in the order they are listed
-- ARGV[1]  the member of KEYS[1] to start after, "" for its start
-- ARGV[2]  how many members to return
-- Returns  member, its bucket's place in KEYS, member, its place, ...

local wanted = tonumber(ARGV[2])
local page = {}
for place, bucket in ipairs(KEYS) do
  local from = (place == 1 and ARGV[1] ~= "") and ("(" .. ARGV[1]) or "-"
  local left = wanted - #page / 2
  for _, member in ipairs(redis.call("ZRANGEBYLEX", bucket, from, "+", "LIMIT", 0, left)) do
    page[#page + 1] = member
    page[#page + 1] = place
  end
  if #page / 2 >= wanted then
    break
  end
end
return page
