-- See `FENCE_CHECKPOINT` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
local position = redis.call('HGET', KEYS[1], ARGV[1])
if position and not string.find(position, '^%d+$') then return -1 end
local generation = redis.call('HGET', KEYS[2], ARGV[1])
if generation and not string.find(generation, '^%d+$') then return -2 end
generation = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if not position then
  position = '0'
  redis.call('HSET', KEYS[1], ARGV[1], position)
end
return {position, generation}
