-- See `REQUEUE` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
local ob = tonumber(redis.call('HGET', KEYS[1], 'outbox') or '0')
if ob == nil then return -1 end
local info = redis.pcall('XINFO', 'STREAM', KEYS[2])
if type(info) == 'table' and info.err == nil then
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      local top = tonumber(string.match(info[j + 1], '^(%d+)-'))
      if top == nil or top > ob then return -1 end
    end
  end
end
local n = 0
for i = 1, #ARGV do
  local m = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[i], ARGV[i])[1]
  if m then
    local values, at = {}, 1
    while at <= #m do
      local colon = string.find(m, ':', at, true)
      local len = tonumber(string.sub(m, at, colon - 1))
      values[#values + 1] = string.sub(m, colon + 1, colon + len)
      at = colon + len + 1
    end
    local fields = {}
    for j = 1, #values, 2 do
      local name = values[j]
      if name ~= 'position' and name ~= 'error' and name ~= 'attempts' and name ~= 'dead_at' then
        fields[#fields + 1] = name
        fields[#fields + 1] = values[j + 1]
      end
    end
    ob = ob + 1
    redis.call('XADD', KEYS[2], string.format('%.0f', ob) .. '-0', unpack(fields))
    redis.call('ZREM', KEYS[3], m)
    n = n + 1
  end
end
if n > 0 then redis.call('HSET', KEYS[1], 'outbox', string.format('%.0f', ob)) end
return n
