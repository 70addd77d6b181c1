-- See `DELETE_SNAPSHOT` in es-redis/src/script.rs for KEYS, ARGV and the reply.
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
