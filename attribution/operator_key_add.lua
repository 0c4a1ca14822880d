-- Add an operator API key (attribution/keys_cli.py): its hash and when it was added,
-- both or neither, and never over an existing name (`oddsgate keys add` exits 2 then).
-- KEYS[1] og:keys (name -> sha256 hex), KEYS[2] og:keys:{og:keys}:added (name -> Unix seconds),
-- one slot in a cluster (attribution/keys.py)
-- ARGV[1] name, ARGV[2] sha256 hex of the key, ARGV[3] Unix seconds
-- Returns 1 when added, 0 when the name is taken.
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
