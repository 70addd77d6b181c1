//! The server-side Lua scripts and their invocation (EVALSHA, reloaded on NOSCRIPT).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ErrorKind, RedisResult, ServerErrorKind, Value};

/// The append script: applies a group of appends, each to one stream, in order, atomically as a
/// whole, each with its own outcome. See the crate docs, sections "The append script" and "Group
/// commit".
///
/// KEYS: 1 the feed, 2 the index hash (head fields and event ids), 3 the outbox, then two per
/// append: the stream's events, its version.
/// ARGV: 1 the number of appends `m`, then per append: expected version (`any`, `none`,
/// `exists` or a decimal), stream id, number of events `n`, number of outbox messages `k`, five
/// per event (event id, type, schema version, payload, metadata) and eight per message (message
/// id, source event id, topic, key, type, schema version, payload, metadata).
///
/// Lists handed to `unpack` (id lookups, index and version writes) go to `redis.call` in chunks of
/// 500 keys or 1000 arguments, so that no call exceeds Lua's C stack limit (8000 slots) however
/// large the group.
///
/// Replies three elements per append, `code, x, y`:
/// - `0, version, first_position` (`first_position` nil for an empty append): appended;
/// - `1, refs, nil`: some event ids are stored already, nothing was written; `refs` holds one
///   element per event, nil or `"<position> <version> <stream>"` (just `"<position>"` if the
///   feed no longer holds that position);
/// - `2, actual, nil`: the expected version does not match, nothing was written;
/// - `3, what, nil`: a key holds data the store did not write, nothing was written;
/// - `4, error, nil`: the server refused the append's first write (out of memory), nothing was
///   written.
///
/// After an append's first write no command of it can fail: every key written is of the right
/// type (checked by the reads before it or by the guarded first `XADD` of each append) and every
/// entry id is above the key's last id (the feed and outbox are checked before the first write,
/// and a stream's first `XADD` fails cleanly if an entry at or beyond its next version exists).
///
/// The script is written for the cost model of Redis' Lua: every string it builds and every
/// table it creates costs about as much as a small Redis command, so numbers go to `redis.call`
/// as numbers (Redis formats them in C), index entries hold just the position, and the replies
/// are one flat table.
pub(crate) const APPEND: &str = r"
local m = tonumber(ARGV[1])
local CHUNK = 500

local starts, ns, ks, ids, vkeys = {}, {}, {}, {}, {}
local writes, messages = false, false
local a, nids = 2, 0
for i = 1, m do
  local n, k = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  starts[i], ns[i], ks[i], vkeys[i] = a, n, k, KEYS[3 + 2 * i]
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
local got = redis.call('HMGET', KEYS[2], 'position', 'recorded_at', 'outbox', unpack(ids, 1, first))
local pos, last_at, ob = tonumber(got[1] or '0'), tonumber(got[2] or '0'), tonumber(got[3] or '0')
for j = 1, first do
  if got[j + 3] then found[ids[j]] = got[j + 3] end
end
for s = first + 1, nids, CHUNK do
  local e = math.min(s + CHUNK - 1, nids)
  local more = redis.call('HMGET', KEYS[2], unpack(ids, s, e))
  for j = s, e do
    if more[j - s + 1] then found[ids[j]] = more[j - s + 1] end
  end
end
local stored = {}
for s = 1, m, CHUNK do
  local e = math.min(s + CHUNK - 1, m)
  local more = redis.call('MGET', unpack(vkeys, s, e))
  for i = s, e do stored[i] = more[i - s + 1] end
end

local head_ok = pos ~= nil and last_at ~= nil and ob ~= nil
local feed_ok, outbox_ok, at = true, true, nil
if head_ok and writes then
  feed_ok = #redis.call('XRANGE', KEYS[1], pos + 1, '+', 'COUNT', 1) == 0
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
  if now < last_at then now = last_at end
  at = now
end
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

local versions, changed, written = {}, {}, {}
local index, nindex = {'position', 0, 'recorded_at', at, 'outbox', 0}, 6

local function one(i)
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
        ref = tostring(p)
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
    return 1, refs
  end
  local vkey = vkeys[i]
  local cur = versions[vkey]
  if cur == nil then
    if stored[i] then
      cur = tonumber(stored[i])
      if cur == nil then return 3, 'version' end
    else
      if type(redis.pcall('GET', vkey)) == 'table' then return 3, 'version' end
      cur = 0
    end
  end
  local expected = ARGV[h]
  local ok
  if expected == 'any' then ok = true
  elseif expected == 'none' then ok = cur == 0
  elseif expected == 'exists' then ok = cur > 0
  else ok = cur == tonumber(expected) end
  if not ok then return 2, cur end
  if n == 0 then return 0, cur end
  if not head_ok then return 3, 'head' end
  if not feed_ok then return 3, 'feed' end
  if k > 0 and not outbox_ok then return 3, 'outbox' end

  local ekey, stream = KEYS[2 + 2 * i], ARGV[h + 1]
  local v, p = cur + 1, pos + 1
  local e = h + 4
  local r = redis.pcall('XADD', ekey, v,
    'event_id', ARGV[e], 'type', ARGV[e + 1], 'schema', ARGV[e + 2],
    'payload', ARGV[e + 3], 'metadata', ARGV[e + 4], 'position', p, 'recorded_at', at)
  if type(r) == 'table' and r.err then
    local code = string.match(r.err, '^(%S+)')
    if code == 'WRONGTYPE' then return 3, 'events-type' end
    if code == 'ERR' then return 3, 'events' end
    return 4, r.err
  end
  while true do
    redis.call('XADD', KEYS[1], p, 'stream', stream, 'version', v,
      'event_id', ARGV[e], 'type', ARGV[e + 1], 'schema', ARGV[e + 2],
      'payload', ARGV[e + 3], 'metadata', ARGV[e + 4], 'recorded_at', at)
    written[ARGV[e]] = p
    index[nindex + 1], index[nindex + 2] = ARGV[e], p
    nindex = nindex + 2
    if e + 5 > last then break end
    e, v, p = e + 5, v + 1, p + 1
    redis.call('XADD', ekey, v,
      'event_id', ARGV[e], 'type', ARGV[e + 1], 'schema', ARGV[e + 2],
      'payload', ARGV[e + 3], 'metadata', ARGV[e + 4], 'position', p, 'recorded_at', at)
  end
  for b = last + 4, last + 3 + k * 8, 8 do
    ob = ob + 1
    redis.call('XADD', KEYS[3], ob, 'stream', stream,
      'message_id', ARGV[b], 'source', ARGV[b + 1], 'topic', ARGV[b + 2], 'key', ARGV[b + 3],
      'type', ARGV[b + 4], 'schema', ARGV[b + 5], 'payload', ARGV[b + 6],
      'metadata', ARGV[b + 7], 'recorded_at', at)
  end
  local first_pos = pos + 1
  pos = pos + n
  if versions[vkey] == nil then changed[#changed + 1] = vkey end
  versions[vkey] = cur + n
  return 0, cur + n, first_pos
end

local replies = {}
for i = 1, m do
  local code, x, y = one(i)
  replies[3 * i - 2], replies[3 * i - 1], replies[3 * i] = code, x, y or false
end

if #changed > 0 then
  index[2], index[6] = pos, ob
  for s = 1, nindex, 2 * CHUNK do
    redis.call('HSET', KEYS[2], unpack(index, s, math.min(s + 2 * CHUNK - 1, nindex)))
  end
  local sets = {}
  for j = 1, #changed do
    sets[#sets + 1] = changed[j]
    sets[#sets + 1] = versions[changed[j]]
    if #sets >= 2 * CHUNK or j == #changed then
      redis.call('MSET', unpack(sets))
      sets = {}
    end
  end
end
return replies
";

/// The snapshot script: upsert-if-newer.
///
/// KEYS: 1 the snapshot hash. ARGV: version, schema version, payload, `recorded_at` (µs), the
/// id of the event at the version (empty if unknown).
/// Replies 1 if written, 0 if a snapshot at the same or a newer version is stored.
pub(crate) const SAVE_SNAPSHOT: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '')
if stored ~= nil and stored >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'schema', ARGV[2], 'payload', ARGV[3],
  'recorded_at', ARGV[4], 'event_id', ARGV[5])
return 1
";

/// The snapshot deleted if it is at the given version (a newer one saved meanwhile stays).
///
/// KEYS: 1 the snapshot hash. ARGV: version. Replies 1 if deleted, 0 otherwise.
pub(crate) const DELETE_SNAPSHOT: &str = r"
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The relay lease and checkpoint scripts the store loads when it is built live with the rest of
/// the outbox code.
pub(crate) use crate::outbox::{ACQUIRE_LEASE, RELEASE_LEASE, SAVE_CHECKPOINT};

/// A Lua script known by its SHA1, invoked with EVALSHA and loaded when the server lacks it.
#[derive(Debug)]
pub(crate) struct Lua {
    source: &'static str,
    sha: String,
}

impl Lua {
    pub(crate) fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    }

    /// An `EVALSHA` command with `keys`; the caller adds the arguments.
    pub(crate) fn command(&self, keys: &[&str]) -> Cmd {
        let mut cmd = self.evalsha(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        cmd
    }

    /// An `EVALSHA` command with room for `num_keys` keys; the caller adds the keys, then the
    /// arguments.
    pub(crate) fn evalsha(&self, num_keys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(num_keys);
        cmd
    }

    /// Loads the script into the server's script cache.
    pub(crate) async fn load(&self, conn: &mut ConnectionManager) -> RedisResult<()> {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(self.source)
            .query_async(conn)
            .await?;
        debug_assert_eq!(sha, self.sha);
        Ok(())
    }

    /// Runs `cmd` (built by [`Lua::command`]); if the server has lost the script (restart,
    /// `SCRIPT FLUSH`, failover) it is loaded and the command sent again. A NOSCRIPT reply
    /// means the script did not run, so resending cannot apply it twice. The cache can be
    /// flushed again between the load and the resend (another client's `SCRIPT FLUSH`), so this
    /// tries [`NOSCRIPT_RELOADS`] times before giving up with the NOSCRIPT error.
    pub(crate) async fn invoke(
        &self,
        conn: &mut ConnectionManager,
        cmd: &Cmd,
    ) -> RedisResult<Value> {
        let mut reloads = 0;
        loop {
            match query(conn, cmd).await {
                Err(err)
                    if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && reloads < NOSCRIPT_RELOADS =>
                {
                    reloads += 1;
                    tracing::debug!(sha = %self.sha, reloads, "script missing on the server; loading it");
                    self.load(conn).await?;
                }
                other => return other,
            }
        }
    }
}

/// How many times [`Lua::invoke`] loads a script the server answered NOSCRIPT for.
const NOSCRIPT_RELOADS: u32 = 5;

/// Sends one command and returns its reply, with a top-level error reply turned into `Err`.
///
/// Unlike `Cmd::query_async` this does not walk nested replies looking for errors: the replies
/// used here (stream entries, script results) cannot hold nested errors, and large pages are read
/// without the extra pass.
pub(crate) async fn query(conn: &mut ConnectionManager, cmd: &Cmd) -> RedisResult<Value> {
    match conn.req_packed_command(cmd).await? {
        Value::ServerError(err) => Err(err.into()),
        value => Ok(value),
    }
}
