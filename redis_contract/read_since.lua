-- Every event of a topic after a seq, if history still holds them all.
--
-- KEYS[1] meta hash, KEYS[2] history stream
-- ARGV[1] since seq, ARGV[2] most events to return
-- returns {epoch|false, head seq, covered 0/1, event...} (events after `since`,
-- in seq order); {false, 0, 0} when the topic has no seq space
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not meta[1] then return {false, 0, 0} end
local head = tonumber(meta[2])
local want = head - tonumber(ARGV[1])
if want <= 0 then return {meta[1], head, 1} end
if want > tonumber(ARGV[2]) then return {meta[1], head, 0} end
local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', want)
if #entries < want then return {meta[1], head, 0} end
local out = {meta[1], head, 1}
for i = #entries, 1, -1 do
  local fields = entries[i][2]
  for j = 1, #fields, 2 do
    if fields[j] == 'e' then out[#out + 1] = fields[j + 1] end
  end
end
return out
