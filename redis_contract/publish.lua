-- One atomic publish (PROTOCOL.md §7): assign the seq, append to history,
-- record the market's latest state, PUBLISH. Nothing else runs in between,
-- so history and the channel never disagree and seqs have no gaps.
--
-- KEYS[1] meta hash, KEYS[2] history stream, KEYS[3] latest hash
-- ARGV[1] topic (also the channel)
-- ARGV[2] epoch to create if the topic has none (its seq space starts here)
-- ARGV[3] market id ("sport:league:market"), or a stats row's key
-- ARGV[4] the event's JSON body after the seq: `"market":...}` (no leading brace)
-- ARGV[5] history to keep, in milliseconds
-- ARGV[6] how long the topic's keys outlive its last publish, in milliseconds
--         (0: forever); every publish renews all three together
-- ARGV[7] (optional) the seq this event must have, its epoch being ARGV[2]:
--         a deterministic aggregator's publish (PROTOCOL.md §8). Absent or 0:
--         the next seq of the topic's epoch, as any publisher.
-- ARGV[8] (optional) the event's type: `odds` when absent, `stats` for a
--         partner's statistics row (PROTOCOL.md §12), whose body starts with
--         `"key":` and whose key plays the market's role in the latest hash.
-- ARGV[9], ARGV[10] (optional) the epoch and seq this publisher last got back
--         for the topic. If the topic is still in that epoch but below that
--         seq, Redis lost writes it had acknowledged (a failover to a replica
--         that was behind, a restart that lost the append-only file's last
--         second): the seqs after it would be reused for other events, which
--         followers that saw the lost ones could not tell apart. The topic
--         starts a new epoch instead, so every follower resets.
--
-- The event goes out with SPUBLISH (sharded pub/sub, Redis 7): on a Redis
-- Cluster it stays within the shard that owns the topic's slot, which the
-- channel shares with the keys (the topic is their hash tag), and on a single
-- server it works the same; workers follow topics with SSUBSCRIBE.
-- returns {epoch, seq, published}: published is 0 when a pinned seq was
-- already there (a restarted aggregator going over its last events again)
local pinned = tonumber(ARGV[7] or '0') or 0
local kind = ARGV[8] or 'odds'
if kind ~= 'odds' and kind ~= 'stats' then
  return redis.error_reply('TYPE ' .. kind .. ' is not an event type')
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if pinned > 0 and epoch and epoch ~= ARGV[2] then
  -- The aggregator's stream moved to a new generation: a new seq space.
  epoch = false
end
local known_seq = tonumber(ARGV[10] or '0') or 0
if epoch and known_seq > 0 and epoch == ARGV[9]
    and tonumber(redis.call('HGET', KEYS[1], 'seq')) < known_seq then
  epoch = false
end
if not epoch then
  -- A topic without an epoch has no seq space: anything left under its other
  -- keys belongs to a lost one and must not be mixed with the new.
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  if pinned > 1 then
    -- This Redis lost the topic (or never had its start): the stream goes on
    -- at its own seq; resumes from before it find no history and are reset.
    redis.call('HSET', KEYS[1], 'seq', pinned - 1)
  end
end
if pinned > 0 then
  local current = tonumber(redis.call('HGET', KEYS[1], 'seq'))
  if pinned <= current then
    return {epoch, current, 0}
  end
  if pinned > current + 1 then
    return redis.error_reply('GAP ' .. ARGV[1] .. ' is at seq ' .. current
      .. ', refusing seq ' .. pinned)
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local event = '{"type":"' .. kind .. '","topic":"' .. ARGV[1] .. '","epoch":"' .. epoch
  .. '","seq":' .. seq .. ',' .. ARGV[4]
local now = redis.call('TIME')
local cutoff = (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) - tonumber(ARGV[5])
if cutoff < 0 then cutoff = 0 end
redis.call('XADD', KEYS[2], 'MINID', '~', cutoff, '*', 's', seq, 'e', event)
redis.call('HSET', KEYS[3], ARGV[3], event)
local ttl = tonumber(ARGV[6]) or 0
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
end
redis.call('SPUBLISH', ARGV[1], event)
return {epoch, seq, 1}
