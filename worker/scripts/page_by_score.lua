-- One page of a sorted set in score order, after the last member of the page before: the
-- console's list of credentials by due time, or by time of the last write among the failing.
-- Cost O(log N + page), plus the members tied at the cursor's score when the cursor's member
-- has moved since (a rotation, a claim) and its rank no longer says where the page ended.
--
-- KEYS[1]  the sorted set
-- ARGV[1]  the score of the last member shown, "" for the first page
-- ARGV[2]  that member
-- ARGV[3]  how many members to return
-- ARGV[4]  "desc" for the highest scores first, else the lowest
-- Returns  member, score, member, score, ...

local key, after_score, after, count = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local descending = ARGV[4] == "desc"
local range = descending and "ZREVRANGE" or "ZRANGE"

-- Whether a member tied at the cursor's score is listed before the cursor's member: ties are
-- listed by member, backwards when descending.
local function before_cursor(member)
  if descending then
    return member >= after
  end
  return member <= after
end

-- The rank of the first member past a cursor whose member moved: past every member with a
-- score before the cursor's, and past the ties that sort before the cursor's member.
local function rank_past(score)
  local start
  if descending then
    start = redis.call("ZCOUNT", key, "(" .. after_score, "+inf")
  else
    start = redis.call("ZCOUNT", key, "-inf", "(" .. after_score)
  end
  while true do
    local tied = redis.call(range, key, start, start + 99, "WITHSCORES")
    for i = 1, #tied, 2 do
      if tonumber(tied[i + 1]) ~= score or not before_cursor(tied[i]) then
        return start
      end
      start = start + 1
    end
    if #tied < 200 then
      return start
    end
  end
end

local start = 0
if after_score ~= "" then
  local score = tonumber(after_score)
  local current = redis.call("ZSCORE", key, after)
  if current and tonumber(current) == score then
    start = redis.call(descending and "ZREVRANK" or "ZRANK", key, after) + 1
  else
    start = rank_past(score)
  end
end
return redis.call(range, key, start, start + count - 1, "WITHSCORES")
