-- See `MARK_DELIVERED` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
local gone, n = {}, 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i] .. '-0'
  local entry = redis.call('XRANGE', KEYS[2], id, id)[1]
  if entry then
    local f = entry[2]
    for j = 1, #f, 2 do
      if f[j] == 'message_id' then
        if f[j + 1] == ARGV[i + 1] then
          n = n + 1
          gone[n] = id
        end
        break
      end
    end
  end
  if n >= 500 then
    redis.call('XDEL', KEYS[2], unpack(gone))
    gone, n = {}, 0
  end
end
if n > 0 then redis.call('XDEL', KEYS[2], unpack(gone)) end
return 1
