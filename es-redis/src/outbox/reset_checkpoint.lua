-- See `RESET_CHECKPOINT` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
redis.call('HSET', KEYS[1], ARGV[1], '0')
return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
