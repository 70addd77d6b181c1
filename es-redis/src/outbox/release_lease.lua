-- See `RELEASE_LEASE` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
local l = redis.call('HMGET', KEYS[1], 'owner', 'generation')
if l[1] == ARGV[1] and l[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'expires', '0')
  return 1
end
return 0
