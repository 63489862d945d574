-- Put records stored before the id index existed into it (`python -m worker reindex`): each
-- id whose record is still there, checked in the same atomic step, so that an id deleted
-- meanwhile is not brought back. Adding an id already indexed changes nothing.
--
-- KEYS[1]         the id index's bitmap of user buckets in use
-- KEYS[3i-1..3i+1] for the i-th id: its record key, its team's id set, its user's bucket
-- ARGV[2i-1..2i]  for the i-th id: the credential id, its user's bucket number
-- Returns         how many ids had a record.

-- include: id_index

local indexed = 0
for i = 1, #ARGV / 2 do
  local first = 3 * i - 1
  if redis.call("EXISTS", KEYS[first]) == 1 then
    index_id(KEYS[first + 1], KEYS[first + 2], KEYS[1], ARGV[2 * i - 1], ARGV[2 * i])
    indexed = indexed + 1
  end
end
return indexed
