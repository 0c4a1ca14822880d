-- A topic's state as of one seq (PROTOCOL.md §3 snapshot). Read-only: a read
-- never creates a key, so reading any number of never-published topics costs
-- Redis nothing (feed/contract.py, "Reads never write").
--
-- KEYS[1] meta hash, KEYS[2] latest hash
-- returns {epoch, seq, {event, ...}}, or {false, 0, {}} when the topic has no
-- seq space (never published, or its keys expired)
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not meta[1] then return {false, 0, {}} end
return {meta[1], tonumber(meta[2]), redis.call('HVALS', KEYS[2])}
