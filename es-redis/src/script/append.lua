-- The append function's body: see `APPEND` in es-redis/src/script.rs for KEYS, ARGV and the
-- replies. The reply codes and the expected-version modes are named as in
-- es-redis/src/protocol.rs (`AppendCode`, `ExpectedMode`), whose tests check that both agree.
local APPENDED, DUPLICATE, CONFLICT, CORRUPT, REFUSED, EVICTING, EXHAUSTED, HELD, CLOSED = 0, 1, 2, 3, 4, 5, 6, 7, 8
local ANY, NO_STREAM, STREAM_EXISTS = 'any', 'none', 'exists'
-- The type of a stream's tombstone (es_core::CLOSED_EVENT_TYPE): an append whose last event has
-- it closes the stream, and every later append to the stream is refused with CLOSED.
local TOMBSTONE = '$closed'

local m = tonumber(ARGV[1])
local floor = tonumber(ARGV[2])
local allow_evict = ARGV[3] == '1' or ARGV[3] == '3'
-- All or nothing (a multi-stream append): every append is checked before the first write, and
-- none is written unless all pass.
local atomic = ARGV[3] == '2' or ARGV[3] == '3'
local CHUNK = 500
local SPAN = 4194304
local ORIGIN = 1704067200
local LAST = 9007199254740991
-- Integers go to redis.call as strings made with '%d': Redis 7.0 would format a Lua number
-- with printf's '%.17g', which costs several times as much.
local fmt = string.format

local starts, ns, ks, ids, vkeys, ckeys, vckeys = {}, {}, {}, {}, {}, {}, {}
local writes, messages = false, false
local a, nids = 4, 0
for i = 1, m do
  local n, k = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  starts[i], ns[i], ks[i], vkeys[i], ckeys[i] = a, n, k, KEYS[3 + 3 * i], KEYS[4 + 3 * i]
  vckeys[2 * i - 1], vckeys[2 * i] = vkeys[i], ckeys[i]
  for j = a + 4, a + 3 + n * 5, 5 do
    nids = nids + 1
    ids[nids] = ARGV[j]
  end
  if n > 0 then writes = true end
  if k > 0 then messages = true end
  a = a + 4 + n * 5 + k * 8
end

local found = {}
local first = math.min(nids, CHUNK)
local got = redis.call('HMGET', KEYS[2], 'position', 'recorded_at', 'outbox', 'run',
  unpack(ids, 1, first))
local pos, last_at, ob = tonumber(got[1] or '0'), tonumber(got[2] or '0'), tonumber(got[3] or '0')
local stored_run = got[4]
for j = 1, first do
  if got[j + 4] then found[ids[j]] = got[j + 4] end
end
for s = first + 1, nids, CHUNK do
  local e = math.min(s + CHUNK - 1, nids)
  local more = redis.call('HMGET', KEYS[2], unpack(ids, s, e))
  for j = s, e do
    if more[j - s + 1] then found[ids[j]] = more[j - s + 1] end
  end
end
-- Each stream's version and tombstone version (nil while open), in one MGET per chunk.
local stored, shut = {}, {}
for s = 1, 2 * m, CHUNK do
  local e = math.min(s + CHUNK - 1, 2 * m)
  local more = redis.call('MGET', unpack(vckeys, s, e))
  for j = s, e do
    local i = math.floor((j + 1) / 2)
    if j % 2 == 1 then stored[i] = more[j - s + 1] else shut[i] = more[j - s + 1] end
  end
end

local head_ok = pos ~= nil and last_at ~= nil and ob ~= nil
local feed_ok, outbox_ok, at = true, true, nil
if head_ok and writes then
  feed_ok = #redis.call('XRANGE', KEYS[1], fmt('%d', pos + 1), '+', 'COUNT', 1) == 0
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
  if now < last_at then now = last_at end
  at = now
end
local ats = at and fmt('%d', at)
if head_ok and messages then
  local info = redis.pcall('XINFO', 'STREAM', KEYS[3])
  if type(info) == 'table' and info.err == nil then
    for j = 1, #info, 2 do
      if info[j] == 'last-generated-id' then
        local top = tonumber(string.match(info[j + 1], '^(%d+)-'))
        outbox_ok = top ~= nil and top <= ob
      end
    end
  elseif type(info) == 'table' and not string.find(info.err, 'no such key', 1, true) then
    outbox_ok = false
  end
end

-- Which server process is this? Its run_id is new in every process, so a restart (whatever it
-- replayed) or a failover shows as a run_id the index does not hold; so does the first write
-- ever. (current_run reads it once per process, see APPEND_LIBRARY.) The first write of a new incarnation, or one that finds the head below what the caller
-- has already seen, starts an epoch (see es_core::contract::position::next_epoch): the seconds since
-- 2024-01-01 by the server's clock, but above the last recorded epoch and above the epoch of
-- every position known to be handed out, so that positions and outbox positions continue above
-- anything an earlier incarnation can have handed out.
local run, epoch, cause, evicting = stored_run or '', nil, nil, nil
local old_pos, old_ob = pos, ob
if head_ok and writes then
  run = current_run()
  if run ~= stored_run or pos < floor then
    local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
    if run == stored_run then cause = ''
    elseif stored_run or got[1] or last then cause = 'server'
    else cause = 'new' end
    if pos < floor then
      if cause == 'server' then cause = 'server,head' else cause = 'head' end
    end
    epoch = math.floor(at / 1000000) - ORIGIN
    if last then epoch = math.max(epoch, tonumber(string.match(last[1], '^(%d+)-')) + 1) end
    local handed = math.max(pos, floor)
    if handed > 0 then epoch = math.max(epoch, math.floor(handed / SPAN) + 1) end
    pos = epoch * SPAN
    if ob < pos then ob = pos end
    if not allow_evict then
      local policy = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([%w%-]+)')
      if policy ~= 'noeviction' and not (policy and string.find(policy, '^volatile%-')) then
        evicting = policy or 'unknown'
      end
    end
  end
end

-- closing: the tombstone version of each stream closed by an append of this call, by its key.
local versions, changed, written, closing = {}, {}, {}, {}
local index, nindex = {'position', 0, 'recorded_at', ats or '0', 'outbox', 0, 'run', run}, 8

-- Appends the i-th append, or with `dry` only checks it: then it writes nothing, takes its
-- positions from `pos` and `ob` as the write would (the caller restores them) and replies HELD
-- if the write would go through.
local function one(i, dry)
  local h, n, k = starts[i], ns[i], ks[i]
  local last = h + n * 5
  local any = false
  for e = h + 4, last, 5 do
    if found[ARGV[e]] or written[ARGV[e]] then any = true break end
  end
  if any then
    -- Rare: where each stored id is, as `<position> <version> <stream>` from its feed entry.
    local refs = {}
    for e = h + 4, last, 5 do
      local p = found[ARGV[e]] or written[ARGV[e]]
      local ref = false
      if p then
        ref = string.format('%.0f', tonumber(p))
        local range = redis.pcall('XRANGE', KEYS[1], p, p)
        local entry = type(range) == 'table' and range.err == nil and range[1]
        if entry then
          local f, s, v = entry[2], nil, nil
          for j = 1, #f, 2 do
            if f[j] == 'stream' then s = f[j + 1] elseif f[j] == 'version' then v = f[j + 1] end
          end
          if s and v then ref = ref .. ' ' .. v .. ' ' .. s end
        end
      end
      refs[#refs + 1] = ref
    end
    return DUPLICATE, refs
  end
  -- A closed stream takes no append, whatever its expected version (an exact retry of a batch
  -- stored before, the close included, is a DUPLICATE above).
  local ckey = ckeys[i]
  local tomb = closing[ckey] or shut[i]
  if tomb then
    local v = tonumber(tomb)
    if v == nil then return CORRUPT, 'closed' end
    return CLOSED, v
  end
  local vkey = vkeys[i]
  local cur = versions[vkey]
  if cur == nil then
    if stored[i] then
      cur = tonumber(stored[i])
      if cur == nil then return CORRUPT, 'version' end
    else
      if type(redis.pcall('GET', vkey)) == 'table' then return CORRUPT, 'version' end
      cur = 0
    end
  end
  local expected = ARGV[h]
  local ok
  if expected == ANY then ok = true
  elseif expected == NO_STREAM then ok = cur == 0
  elseif expected == STREAM_EXISTS then ok = cur > 0
  else ok = cur == tonumber(expected) end
  if not ok then return CONFLICT, cur end
  if n == 0 then return APPENDED, cur end
  if not head_ok then return CORRUPT, 'head' end
  if not feed_ok then return CORRUPT, 'feed' end
  if k > 0 and not outbox_ok then return CORRUPT, 'outbox' end
  if evicting then return EVICTING, evicting end
  if pos + n > LAST then return EXHAUSTED, 'positions' end
  if ob + k > LAST then return EXHAUSTED, 'outbox positions' end

  local ekey, stream = KEYS[2 + 3 * i], ARGV[h + 1]
  if dry then
    -- What the guarded first XADD below checks: the events key is a stream with no entry at or
    -- beyond the next version.
    local top = redis.pcall('XREVRANGE', ekey, '+', '-', 'COUNT', 1)
    if type(top) == 'table' and top.err then
      if string.match(top.err, '^(%S+)') == 'WRONGTYPE' then return CORRUPT, 'events-type' end
      return REFUSED, top.err
    end
    if top[1] and (tonumber(string.match(top[1][1], '^(%d+)-')) or LAST) > cur then
      return CORRUPT, 'events'
    end
    pos, ob = pos + n, ob + k
    return HELD, cur + n
  end
  local v, p = cur + 1, pos + 1
  local e = h + 4
  local vs, ps = fmt('%d', v), fmt('%d', p)
  local r = redis.pcall('XADD', ekey, vs,
    'event_id', ARGV[e], 'type', ARGV[e + 1], 'schema', ARGV[e + 2],
    'payload', ARGV[e + 3], 'metadata', ARGV[e + 4], 'position', ps, 'recorded_at', ats)
  if type(r) == 'table' and r.err then
    local code = string.match(r.err, '^(%S+)')
    if code == 'WRONGTYPE' then return CORRUPT, 'events-type' end
    -- An entry at or beyond the next version exists; any other refusal (out of memory, a
    -- command the user may not run) is the server's, and reported as such.
    if code == 'ERR' and string.find(r.err, 'equal or smaller', 1, true) then
      return CORRUPT, 'events'
    end
    return REFUSED, r.err
  end
  while true do
    redis.call('XADD', KEYS[1], ps, 'stream', stream, 'version', vs,
      'event_id', ARGV[e], 'type', ARGV[e + 1], 'schema', ARGV[e + 2],
      'payload', ARGV[e + 3], 'metadata', ARGV[e + 4], 'recorded_at', ats)
    written[ARGV[e]] = p
    index[nindex + 1], index[nindex + 2] = ARGV[e], ps
    nindex = nindex + 2
    if e + 5 > last then break end
    e, v, p = e + 5, v + 1, p + 1
    vs, ps = fmt('%d', v), fmt('%d', p)
    redis.call('XADD', ekey, vs,
      'event_id', ARGV[e], 'type', ARGV[e + 1], 'schema', ARGV[e + 2],
      'payload', ARGV[e + 3], 'metadata', ARGV[e + 4], 'position', ps, 'recorded_at', ats)
  end
  for b = last + 4, last + 3 + k * 8, 8 do
    ob = ob + 1
    redis.call('XADD', KEYS[3], fmt('%d', ob), 'stream', stream,
      'message_id', ARGV[b], 'source', ARGV[b + 1], 'topic', ARGV[b + 2], 'key', ARGV[b + 3],
      'type', ARGV[b + 4], 'schema', ARGV[b + 5], 'payload', ARGV[b + 6],
      'metadata', ARGV[b + 7], 'recorded_at', ats)
  end
  local first_pos = pos + 1
  pos = pos + n
  if versions[vkey] == nil then changed[#changed + 1] = vkey end
  versions[vkey] = cur + n
  if ARGV[last] == TOMBSTONE then
    -- The last event is the tombstone: the stream is closed from now on.
    local vs_last = fmt('%d', cur + n)
    redis.call('SET', ckey, vs_last)
    closing[ckey] = vs_last
  end
  return APPENDED, cur + n, first_pos
end

local replies = {}
local blocked = false
if atomic then
  local pos0, ob0 = pos, ob
  for i = 1, m do
    local code, x, y = one(i, true)
    replies[3 * i - 2], replies[3 * i - 1], replies[3 * i] = code, x, y or false
    if code ~= HELD and code ~= APPENDED then blocked = true end
  end
  pos, ob = pos0, ob0
end
if not blocked then
  for i = 1, m do
    local code, x, y = one(i, false)
    replies[3 * i - 2], replies[3 * i - 1], replies[3 * i] = code, x, y or false
  end
end

local started, started_cause = 0, ''
if #changed > 0 then
  index[2], index[6] = fmt('%d', pos), fmt('%d', ob)
  for s = 1, nindex, 2 * CHUNK do
    redis.call('HSET', KEYS[2], unpack(index, s, math.min(s + 2 * CHUNK - 1, nindex)))
  end
  local sets = {}
  for j = 1, #changed do
    sets[#sets + 1] = changed[j]
    sets[#sets + 1] = fmt('%d', versions[changed[j]])
    if #sets >= 2 * CHUNK or j == #changed then
      redis.call('MSET', unpack(sets))
      sets = {}
    end
  end
  if epoch then
    redis.call('XADD', KEYS[4], epoch, 'previous_head', old_pos, 'previous_outbox', old_ob,
      'run_id', run, 'previous_run_id', stored_run or '', 'cause', cause, 'recorded_at', at)
    started, started_cause = epoch, cause
  end
end
replies[3 * m + 1], replies[3 * m + 2], replies[3 * m + 3] = started, old_pos, started_cause
return replies
