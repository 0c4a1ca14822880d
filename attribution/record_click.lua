-- Record one click: dedupe check, stream append and index, atomically (PROTOCOL.md §9).
-- KEYS[1] og:clicks   KEYS[2] og:click:{og:clicks}:<click_id>
-- KEYS[3] og:dedupe:{og:clicks}:<code>:<digest>   (one slot in a cluster: attribution/keys.py)
-- ARGV[1] the record's canonical JSON up to its last field, verdict (ends with ",")
-- ARGV[2] the verdict when already known ("bot"), or "" to decide ok/duplicate here
-- ARGV[3] dedupe window (ms)   ARGV[4] attribution window (ms)
-- ARGV[5..] field, value pairs of the index hash (every field but verdict)
-- Returns {verdict, stream entry id}.
--
-- The verdict is the record's last field, so the JSON is completed here rather
-- than decoded and re-encoded (cjson would not keep the canonical form).
-- Bots never take the dedupe key: a prefetch must not make the person's own
-- click that follows it a duplicate.
local verdict = ARGV[2]
if verdict == '' then
  if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3]) then
    verdict = 'ok'
  else
    verdict = 'duplicate'
  end
end
local id = redis.call('XADD', KEYS[1], '*', 'c', ARGV[1] .. '"verdict":"' .. verdict .. '"}')
redis.call('HSET', KEYS[2], 'verdict', verdict, unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {verdict, id}
