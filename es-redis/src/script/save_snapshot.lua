-- See `SAVE_SNAPSHOT` in es-redis/src/script.rs for KEYS, ARGV and the reply.
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '')
if stored ~= nil and stored >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'schema', ARGV[2], 'payload', ARGV[3],
  'recorded_at', ARGV[4], 'event_id', ARGV[5])
return 1
