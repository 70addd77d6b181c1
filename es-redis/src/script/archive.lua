-- Deletes archived events from hot storage, atomically (see the crate docs, section
-- "Archiving"): the events are in the archive already; this removes, for each one still in hot
-- storage, its stream entry, its feed entry and its event-id index field. It never deletes a
-- stream's last event.
--
-- KEYS: 1 the stream's events, 2 its version, 3 the feed of its partition, 4 the index hash.
-- ARGV: per event, its version, its position and its event id.
-- Replies the number of events deleted from the stream (those an earlier call had not).

-- Every command this script writes with is checked first, so that a user without one of them
-- is refused before the first write (Redis does not roll a script back).
for _, check in ipairs({{'XDEL', KEYS[1], '0-1'}, {'XDEL', KEYS[3], '0-1'}, {'HDEL', KEYS[4], 'x'}}) do
  if not redis.acl_check_cmd(unpack(check)) then
    return redis.error_reply('NOPERM this user has no permissions to run the `' .. check[1] ..
      '` command on ' .. check[2] .. ', which archiving needs')
  end
end
local version = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local moved = 0
for i = 1, #ARGV, 3 do
  local v = tonumber(ARGV[i])
  if v and v < version and redis.call('XDEL', KEYS[1], ARGV[i] .. '-0') == 1 then
    redis.call('XDEL', KEYS[3], ARGV[i + 1] .. '-0')
    redis.call('HDEL', KEYS[4], ARGV[i + 2])
    moved = moved + 1
  end
end
return moved
