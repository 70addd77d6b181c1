-- The store's layout: the one recorded, else the classic one for a store that has the
-- classic layout's head but no record (made before layouts were recorded), else the requested
-- one; recorded if it was not.
local recorded = redis.call('HGET', KEYS[1], 'layout')
if recorded then return recorded end
if redis.call('HGET', KEYS[2], 'position') then
  recorded = 'classic/1'
else
  recorded = ARGV[1]
end
redis.call('HSET', KEYS[1], 'layout', recorded)
return recorded
