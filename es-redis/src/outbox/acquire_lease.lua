-- See `ACQUIRE_LEASE` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local l = redis.call('HMGET', KEYS[1], 'owner', 'generation', 'expires')
local gen, expires = tonumber(l[2] or '0'), tonumber(l[3] or '0')
if gen == nil or expires == nil then return -2 end
if expires > now then
  if l[1] ~= ARGV[1] then return -1 end
else
  gen = gen + 1
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'generation', string.format('%.0f', gen),
  'expires', string.format('%.0f', now + tonumber(ARGV[2])))
return gen
