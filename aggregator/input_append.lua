-- Append a provider's messages to this region's copy of its stream, in order.
--
-- The copy's entry ids are the provider's own seqs (`pseq-0`), so a message
-- sent twice (a writer resending after a lost connection) is recognised and
-- skipped, and a hole is refused instead of written: a region's copy is the
-- provider's stream exactly, or it stops (docs/aggregator.md).
--
-- KEYS[1] the provider's stream in this region
-- ARGV[1] entries to keep (MAXLEN ~; 0: all)
-- ARGV[2], ARGV[3], ...: pseq, canonical message, pseq, message, ...
-- returns the number of messages appended
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if top[1] then
  last = tonumber(string.match(top[1][1], '^(%d+)'))
end
local keep = tonumber(ARGV[1])
local added = 0
for i = 2, #ARGV, 2 do
  local pseq = tonumber(ARGV[i])
  if pseq > last then
    if pseq ~= last + 1 then
      return redis.error_reply('GAP ' .. KEYS[1] .. ' holds pseq ' .. last .. ', refusing ' .. pseq)
    end
    if keep > 0 then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', keep, pseq .. '-0', 'm', ARGV[i + 1])
    else
      redis.call('XADD', KEYS[1], pseq .. '-0', 'm', ARGV[i + 1])
    end
    last = pseq
    added = added + 1
  end
end
return added
