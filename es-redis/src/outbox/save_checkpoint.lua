-- See `SAVE_CHECKPOINT` in es-redis/src/outbox.rs for KEYS, ARGV and the reply. The reply
-- codes are named as in es-redis/src/protocol.rs (`CheckpointSave`).
local SAVED, NOT_HIGHER, NOT_A_NUMBER, FENCED = 1, 0, -1, -2
local generation = redis.call('HGET', KEYS[2], ARGV[1]) or '0'
if generation ~= ARGV[2] then return FENCED end
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local new = string.gsub(ARGV[3], '^0+', '')
if stored then
  if not string.find(stored, '^%d+$') then return NOT_A_NUMBER end
  stored = string.gsub(stored, '^0+', '')
  if #new < #stored or (#new == #stored and new <= stored) then return NOT_HIGHER end
elseif new == '' then
  return NOT_HIGHER
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return SAVED
