-- See `DEAD_LETTER` in es-redis/src/outbox.rs for KEYS, ARGV and the reply.
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local last, last_error
for i = 2, #ARGV, 4 do
  local p = ARGV[i]
  local entry = redis.call('XRANGE', KEYS[2], p .. '-0', p .. '-0')[1]
  if entry then
    local holds = false
    for j = 1, #entry[2], 2 do
      if entry[2][j] == 'message_id' then
        holds = entry[2][j + 1] == ARGV[i + 1]
        break
      end
    end
    if not holds then entry = nil end
  end
  if entry then
    local parts = {}
    local function put(s) parts[#parts + 1] = #s .. ':' .. s end
    for _, v in ipairs(entry[2]) do put(v) end
    put('position') put(p)
    put('error') put(ARGV[i + 2])
    put('attempts') put(ARGV[i + 3])
    put('dead_at') put(now)
    redis.call('ZADD', KEYS[3], p, table.concat(parts))
    redis.call('XDEL', KEYS[2], p .. '-0')
    last, last_error = p, ARGV[i + 2]
  end
end
if last then
  redis.call('HSET', KEYS[1], 'last_error_position', last, 'last_error', last_error,
    'last_error_at', now)
end
return 1
