-- Compare-and-swap of credential records, each with its due-index entry and the aggregates
-- the status report reads (counts by state, the set of failing credentials), in one atomic
-- step: one record (a rotation's commit) or a whole batch of them (an import). A record
-- created here also enters the id index (id_index.lua), which the console searches; a
-- rotation, which changes no id, leaves the index alone. A rotation's commit also lets go of
-- its single-flight lock here, saving a round trip of its own.
--
-- A record is written only if its current version is the expected one: a rotation that
-- used refresh token N commits only while the record still holds token N (the version is
-- bumped whenever the pair changes, and only then). The records of a batch are compared and
-- written one after the other, exactly as one call per record would: a record that repeats
-- an earlier one of the batch is compared against what that one wrote.
--
-- A write whose very bytes are already stored counts as written: it is the retry of a write
-- that landed but whose reply was lost (a timeout, a dropped connection). Records are
-- Fernet-encrypted with a random IV, so no other write stores the same bytes. Those bytes
-- are gone once another write replaced them before the retry: a new grant stored, then
-- rotated by a worker (its refresh token used), would be refused and stored again past the
-- rotation, putting a used token back. A call given an answer key therefore keeps its
-- answer there for a while, and the same call sent again gets that answer back, untouched
-- by what was written since.
--
-- KEYS[1]    the due index (sorted set: id -> due time)
-- KEYS[2]    the counts by state (hash: state -> count)
-- KEYS[3]    the failing credentials (sorted set: id -> time of the write)
-- KEYS[4]    a lock to let go of once the records are written or refused (see lock.py)
-- KEYS[5]    where this call's answer is kept for ANSWER_KEPT_MS, "" for nowhere (only for
--            a call that lets go of no lock)
-- KEYS[6]    the id index's bitmap of user buckets in use
-- KEYS[7]    the id index's mark that it is complete, set here when the first record of an
--            empty store is created (every record is then indexed from its start)
-- and for the i-th credential, from KEYS[5+3i]:
--   its record key, its team's id set, its user's bucket of the id index
-- ARGV[1]    now (epoch seconds), the score in the failing set
-- ARGV[2]    the lock owner's token; "" for no lock
-- and for the i-th credential, from ARGV[5i-2]:
--   expected version: "" if the record must not exist, "corrupt" for an unreadable one
--   the new record bytes
--   the new due time (epoch seconds), or "" to take the credential off the schedule
--   the credential id
--   its user's bucket number in the id index
-- Returns  one pair per credential: {1, the state of the record written over ("" for none or
--          an unreadable one)} when written; {2, ""} when these bytes were already there (a
--          retried write: what the first try wrote over is not known any more); else
--          {0, the version found ("" for none)}. Given a lock owner, then 1 if the lock was
--          let go of (now or by the write being retried), 0 if another owner had it.
-- A new record without a readable header, or a due time that is not a number, is an error
-- raised before anything is written.

-- Longer than a call of new grants is sent again: COMMIT_RETRY_SECONDS, at most 240 s
-- (settings.py), plus one try's socket timeout.
local ANSWER_KEPT_MS = 300000
local FIXED_KEYS, KEYS_PER_RECORD, ARGS_PER_RECORD = 7, 3, 5

-- include: id_index

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

-- What the writes change in the due index, the failing set and the counts is gathered and
-- applied at the end, a few commands for the whole batch instead of four per record (a third
-- of Redis's time per imported credential, measured). A later write of an id overrides an
-- earlier one, as applying them in turn would; every write reads the record the previous one
-- left, so the counts' changes add up as they would one by one.
local due_of, failing_of, written_ids, count_changes = {}, {}, {}, {}

local function add_to_count(state, change)
  count_changes[state] = (count_changes[state] or 0) + change
end

-- The state a write replaced, as answered: a word, else "" (none, unreadable, or odd: no
-- version of ours writes a state that is not a word), so that an answer keeps as lines.
local function reported(state)
  if state and state ~= "unknown" and string.find(state, "^[%w_]+$") then
    return state
  end
  return ""
end

-- Whether the store held no record before this call: the aggregates the writes change are
-- only updated at its end, so they still tell.
local function store_was_empty()
  for _, count in ipairs(redis.call("HVALS", KEYS[2])) do
    if tonumber(count) ~= 0 then
      return false
    end
  end
  return redis.call("ZCARD", KEYS[1]) == 0 and redis.call("ZCARD", KEYS[3]) == 0
end

-- A new record enters the id index; the first of an empty store marks the index complete
-- (looked at once per call: the first record this call creates is the only one that can be).
local completeness_seen = false
local function index_new(first_key, id, bucket)
  if not completeness_seen then
    completeness_seen = true
    if redis.call("EXISTS", KEYS[7]) == 0 and store_was_empty() then
      redis.call("SET", KEYS[7], "1")
    end
  end
  index_id(KEYS[first_key + 1], KEYS[first_key + 2], KEYS[6], id, bucket)
end

-- A corrupt record's state is unknown: it is neither subtracted nor re-added, and the
-- counts are exact again after `python -m worker status --recount`.
local function write(first_key, expected, record, new, due, id, bucket)
  local key = KEYS[first_key]
  local current = redis.call("GET", key)
  local version, old_state = "", nil
  if current then
    local header = header_of(current)
    if header and type(header.st) == "string" then
      version, old_state = tostring(header.v), header.st
    elseif header then -- a state that is not even a string: counted nowhere
      version, old_state = tostring(header.v), "unknown"
    else
      version, old_state = "corrupt", "unknown"
    end
  end
  if version ~= expected then
    if current == record then
      return {2, ""}
    end
    return {0, version}
  end
  redis.call("SET", key, record)
  if not current then
    index_new(first_key, id, bucket)
  end
  if due_of[id] == nil then
    written_ids[#written_ids + 1] = id
  end
  due_of[id] = due
  failing_of[id] = new.st ~= "active" or (new.fc or 0) > 0
  if old_state ~= new.st and old_state ~= "unknown" then
    if old_state then
      add_to_count(old_state, -1)
    end
    add_to_count(new.st, 1)
  end
  return {1, reported(old_state)}
end

-- Lua's unpack takes at most a few thousand values: long lists go in slices.
local function call_with(command, key, values)
  for first = 1, #values, 1000 do
    redis.call(command, key, unpack(values, first, math.min(first + 999, #values)))
  end
end

local function update_indexes()
  local scheduled, unscheduled, failing, not_failing = {}, {}, {}, {}
  for _, id in ipairs(written_ids) do
    if due_of[id] == "" then
      unscheduled[#unscheduled + 1] = id
    else
      scheduled[#scheduled + 1] = due_of[id]
      scheduled[#scheduled + 1] = id
    end
    if failing_of[id] then
      failing[#failing + 1] = ARGV[1]
      failing[#failing + 1] = id
    else
      not_failing[#not_failing + 1] = id
    end
  end
  call_with("ZADD", KEYS[1], scheduled)
  call_with("ZREM", KEYS[1], unscheduled)
  call_with("ZADD", KEYS[3], failing)
  call_with("ZREM", KEYS[3], not_failing)
  for state, change in pairs(count_changes) do
    redis.call("HINCRBY", KEYS[2], state, change)
  end
end

-- One line per record: its code, then its detail (a version or a word, never a newline).
local function keep_answer(results)
  local lines = {}
  for i, result in ipairs(results) do
    lines[i] = result[1] .. result[2]
  end
  redis.call("SET", KEYS[5], table.concat(lines, "\n"), "PX", ANSWER_KEPT_MS)
end

local function kept_answer(text)
  local results = {}
  for line in string.gmatch(text, "[^\n]+") do
    results[#results + 1] = {tonumber(string.sub(line, 1, 1)), string.sub(line, 2)}
  end
  return results
end

local count = math.floor((#KEYS - FIXED_KEYS) / KEYS_PER_RECORD)
if #KEYS ~= FIXED_KEYS + KEYS_PER_RECORD * count or #ARGV ~= 2 + ARGS_PER_RECORD * count then
  return redis.error_reply("expected 7 keys, now and a lock owner, then 3 keys and 5 arguments "
    .. "per record")
end
if KEYS[5] ~= "" then
  if ARGV[2] ~= "" then
    return redis.error_reply("an answer is kept only for a call that lets go of no lock")
  end
  local kept = redis.call("GET", KEYS[5])
  if kept then
    return kept_answer(kept)
  end
end
-- A due time the index would refuse must fail the call before any record is written: the
-- indexes are updated only after all of them.
local function is_score(text)
  local number = tonumber(text)
  return number ~= nil and number == number
end
local headers = {}
for i = 1, count do
  local at = ARGS_PER_RECORD * (i - 1) + 3
  headers[i] = header_of(ARGV[at + 1])
  if not headers[i] then
    return redis.error_reply("the new record " .. i .. " has no readable header")
  end
  local due = ARGV[at + 2]
  if due ~= "" and not is_score(due) then
    return redis.error_reply("the due time of record " .. i .. " is not a number")
  end
end
local results = {}
-- Protected: records written before an error (a key of another type) keep their indexes.
local ok, failure = pcall(function()
  for i = 1, count do
    local at = ARGS_PER_RECORD * (i - 1) + 3
    local first_key = FIXED_KEYS + KEYS_PER_RECORD * (i - 1) + 1
    results[i] = write(
      first_key, ARGV[at], ARGV[at + 1], headers[i], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
    )
  end
end)
update_indexes()
if not ok then
  error(failure, 0)
end
if KEYS[5] ~= "" then
  keep_answer(results)
end
if ARGV[2] ~= "" then
  local owned = redis.call("GET", KEYS[4]) == ARGV[2]
  if owned then
    redis.call("DEL", KEYS[4])
  end
  local retried = count > 0 and results[1][1] == 2
  results[count + 1] = (owned or retried) and 1 or 0
end
return results
