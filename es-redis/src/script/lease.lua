-- The leases of consumer groups: three functions of the store's library (see `LEASE` in
-- es-redis/src/script.rs for KEYS, ARGV and the replies). The reply codes are named as in
-- es-redis/src/protocol.rs (`LeaseCode`).
local LEASE_OK, LEASE_REFUSED, LEASE_CORRUPT, LEASE_EVICTING = 0, 1, 2, 3

-- Milliseconds of the server clock.
local function lease_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A stored lease, `<generation> <expires> <owner>`: the generation (as stored, a decimal
-- string), the expiry (a number) and the owner (any bytes); nil if it is not of that form.
local function lease_parse(stored)
  local generation, expires, at = string.match(stored, '^(%d+) (%d+) ()')
  if not generation then return nil end
  return generation, tonumber(expires), string.sub(stored, at)
end

-- Takes or renews lease ARGV[1] for owner ARGV[2] for ARGV[3] ms; ARGV[4] is '1' if the store
-- allows a server that can evict its keys.
local function lease_acquire(KEYS, ARGV)
  if ARGV[4] ~= '1' then
    local policy = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([%w%-]+)')
    if policy ~= 'noeviction' and not (policy and string.find(policy, '^volatile%-')) then
      return {LEASE_EVICTING, policy or 'unknown'}
    end
  end
  local name, owner = ARGV[1], ARGV[2]
  local now = lease_now()
  local generation, expires, holder = '0', 0, nil
  local stored = redis.call('HGET', KEYS[1], name)
  if stored then
    generation, expires, holder = lease_parse(stored)
    if not generation then return {LEASE_CORRUPT, name} end
  end
  if expires > now then
    if holder ~= owner then return {LEASE_REFUSED, holder} end
  else
    generation = string.format('%.0f', tonumber(generation) + 1)
  end
  local ends = string.format('%.0f', now + tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], name, generation .. ' ' .. ends .. ' ' .. owner)
  redis.call('ZADD', KEYS[2], ends, name)
  -- Leases found expired leave the index (a bounded number per call), so that listing the
  -- held leases reads the held ones only.
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now),
    'LIMIT', 0, 100)
  if #gone > 0 then redis.call('ZREM', KEYS[2], unpack(gone)) end
  return {LEASE_OK, generation}
end

-- Gives lease ARGV[1] up if owner ARGV[2] holds it in generation ARGV[3].
local function lease_release(KEYS, ARGV)
  local name = ARGV[1]
  local stored = redis.call('HGET', KEYS[1], name)
  if not stored then return {LEASE_REFUSED, false} end
  local generation, _, holder = lease_parse(stored)
  if not generation then return {LEASE_CORRUPT, name} end
  if holder ~= ARGV[2] or generation ~= ARGV[3] then return {LEASE_REFUSED, false} end
  redis.call('HSET', KEYS[1], name, generation .. ' 0 ' .. holder)
  redis.call('ZREM', KEYS[2], name)
  return {LEASE_OK, generation}
end

-- The leases held now: name, owner, generation for each, in no particular order.
local function leases_held(KEYS, ARGV)
  local now = lease_now()
  local names = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. string.format('%.0f', now), '+inf')
  local out = {}
  for first = 1, #names, 500 do
    local last = math.min(first + 499, #names)
    local values = redis.call('HMGET', KEYS[1], unpack(names, first, last))
    for i = first, last do
      local stored = values[i - first + 1]
      if stored then
        local generation, expires, holder = lease_parse(stored)
        if not generation then return {LEASE_CORRUPT, names[i]} end
        if expires > now then
          out[#out + 1] = names[i]
          out[#out + 1] = holder
          out[#out + 1] = generation
        end
      end
    end
  end
  return {LEASE_OK, out}
end
