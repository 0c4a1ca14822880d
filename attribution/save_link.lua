-- Store a link and tell every worker, atomically (attribution/link_store.py).
-- KEYS[1] og:links
-- ARGV[1] code   ARGV[2] the link's canonical JSON   ARGV[3] channel og:links:changed
-- ARGV[4] "new": only if the code is free; "swap": only if the stored JSON is ARGV[5]
-- Returns 1 when saved, 0 when the condition failed (taken, or changed meanwhile).
-- On a Redis Cluster the message is a plain PUBLISH, which every node relays, so a
-- worker subscribed on any node hears it; the script has one key, so no slot to share.
-- The message is the link itself, so a worker updates its cache without a read.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[4] == 'new' then
  if current then return 0 end
elseif current ~= ARGV[5] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
