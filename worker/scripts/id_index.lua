-- The id index (worker/idindex.py), kept in the same atomic step as the records it lists: a
-- set per team of its users' ids, and buckets of "<user_id>:<team_id>" chosen by a hash of
-- the user id, with a bitmap of the buckets in use. Included by the scripts that create or
-- delete records; rotations change no id, so they leave it alone.

local function id_parts(id)
  local colon = string.find(id, ":", 1, true)
  return string.sub(id, 1, colon - 1), string.sub(id, colon + 1)
end

local function index_id(team_set, user_bucket, used, id, bucket)
  local team, user = id_parts(id)
  redis.call("SADD", team_set, user)
  redis.call("ZADD", user_bucket, 0, user .. ":" .. team)
  redis.call("SETBIT", used, bucket, 1)
end

local function unindex_id(team_set, user_bucket, used, id, bucket)
  local team, user = id_parts(id)
  redis.call("SREM", team_set, user)
  redis.call("ZREM", user_bucket, user .. ":" .. team)
  if redis.call("EXISTS", user_bucket) == 0 then
    redis.call("SETBIT", used, bucket, 0)
  end
end
