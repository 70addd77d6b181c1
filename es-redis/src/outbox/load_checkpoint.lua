-- See `LOAD_CHECKPOINT` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[2], ARGV[1])}
