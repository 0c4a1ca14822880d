-- Take one conversion exactly once (PROTOCOL.md §10): the first answer to an operator's
-- id is kept and the conversion appended to the stream, in one step, so two posts of
-- the same id (a retry racing the original) count once and both get the first answer.
-- KEYS[1] og:conv:{og:conversions}:<id>   KEYS[2] og:conversions   (one slot: attribution/keys.py)
-- ARGV[1] the answer's JSON   ARGV[2] the conversion record's canonical JSON
-- Returns {1, answer} when taken now, {0, first answer} when the id was taken before.
local first = redis.call('GET', KEYS[1])
if first then
  return {0, first}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'c', ARGV[2])
return {1, ARGV[1]}
