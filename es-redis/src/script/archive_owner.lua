-- The store's identity towards its event archive: a random id recorded in the meta hash the
-- first time the store is built with an archive, and the same ever after.
-- KEYS: 1 the meta hash. ARGV: 1 a fresh random id. Replies the recorded id.
local id = redis.call('HGET', KEYS[1], 'archive_id')
if id then return id end
redis.call('HSET', KEYS[1], 'archive_id', ARGV[1])
return ARGV[1]
