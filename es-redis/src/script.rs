//! The server-side Lua scripts and their invocation (EVALSHA, reloaded on NOSCRIPT).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ErrorKind, RedisResult, ServerErrorKind, Value};

/// The append function's body: applies a group of appends, each to one stream, in order,
/// atomically as a whole, each with its own outcome. See the crate docs, sections "The append
/// script", "Group commit" and "Epochs and lost tails". It runs as a Redis function (see
/// [`append_library`]), with `KEYS` and `ARGV` as its parameters and `current_run` from the
/// library.
///
/// KEYS: 1 the feed, 2 the index hash (head fields and event ids), 3 the outbox, 4 the epoch
/// history, then two per append: the stream's events, its version.
/// ARGV: 1 the number of appends `m`, 2 the highest position the calling handle has seen (its
/// floor), 3 `1` if the store allows an evicting server (else `0`), then per append: expected
/// version (`any`, `none`, `exists` or a decimal), stream id, number of events `n`, number of
/// outbox messages `k`, five per event (event id, type, schema version, payload, metadata) and
/// eight per message (message id, source event id, topic, key, type, schema version, payload,
/// metadata).
///
/// Lists handed to `unpack` (id lookups, index and version writes) go to `redis.call` in chunks of
/// 500 keys or 1000 arguments, so that no call exceeds Lua's C stack limit (8000 slots) however
/// large the group.
///
/// Replies three elements per append, `code, x, y`, then three for the group, `epoch,
/// previous_head, cause`: the epoch this call began (0 if none), the head it began after and
/// why (`new`: the store's first write; see the crate docs, section "Epochs and lost tails").
/// - `0, version, first_position` (`first_position` nil for an empty append): appended;
/// - `1, refs, nil`: some event ids are stored already, nothing was written; `refs` holds one
///   element per event, nil or `"<position> <version> <stream>"` (just `"<position>"` if the
///   feed no longer holds that position);
/// - `2, actual, nil`: the expected version does not match, nothing was written;
/// - `3, what, nil`: a key holds data the store did not write, nothing was written;
/// - `4, error, nil`: the server refused the append's first write (out of memory), nothing was
///   written;
/// - `5, policy, nil`: this is the first write of a new server incarnation and the server's
///   `maxmemory-policy` can evict the store's keys, nothing was written;
/// - `6, what, nil`: the append would take a position or outbox position above 2^53 - 1 (an
///   epoch above [`MAX_EPOCH`](es_core::contract::position::MAX_EPOCH)), nothing was written.
///
/// After an append's first write no command of it can fail: every key written is of the right
/// type (checked by the reads before it or by the guarded first `XADD` of each append) and every
/// entry id is above the key's last id (the feed and outbox are checked before the first write,
/// a stream's first `XADD` fails cleanly if an entry at or beyond its next version exists, and a
/// new epoch's id is above the epoch history's last, read before).
///
/// Numbers are Lua doubles: positions, outbox positions and epochs stay below 2^53, where
/// doubles are exact, and are formatted with `%.0f` where the script builds strings (Lua's
/// `tostring` would switch to exponent notation above 10^14).
///
/// The script is written for the cost model of Redis' Lua: every string it builds and every
/// table it creates costs about as much as a small Redis command, so numbers go to `redis.call`
/// as numbers (Redis formats them in C), index entries hold just the position, and the replies
/// are one flat table.
pub(crate) const APPEND: &str = r"
local m = tonumber(ARGV[1])
local floor = tonumber(ARGV[2])
local allow_evict = ARGV[3] == '1'
local CHUNK = 500
local SPAN = 4194304
local ORIGIN = 1704067200
local LAST = 9007199254740991

local starts, ns, ks, ids, vkeys = {}, {}, {}, {}, {}
local writes, messages = false, false
local a, nids = 4, 0
for i = 1, m do
  local n, k = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  starts[i], ns[i], ks[i], vkeys[i] = a, n, k, KEYS[4 + 2 * i]
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

local versions, changed, written = {}, {}, {}
local index, nindex = {'position', 0, 'recorded_at', at or 0, 'outbox', 0, 'run', run}, 8

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
  if evicting then return 5, evicting end
  if pos + n > LAST then return 6, 'positions' end
  if ob + k > LAST then return 6, 'outbox positions' end

  local ekey, stream = KEYS[3 + 2 * i], ARGV[h + 1]
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

local started, started_cause = 0, ''
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
  if epoch then
    redis.call('XADD', KEYS[4], epoch, 'previous_head', old_pos, 'previous_outbox', old_ob,
      'run_id', run, 'previous_run_id', stored_run or '', 'cause', cause, 'recorded_at', at)
    started, started_cause = epoch, cause
  end
end
replies[3 * m + 1], replies[3 * m + 2], replies[3 * m + 3] = started, old_pos, started_cause
return replies
";

/// The library around [`APPEND`]: one function, `es_append_<hash>`, in a library of the same name
/// (the hash is of the library's code, so that two versions of this crate on one server do not
/// replace each other's).
///
/// The library keeps the server's `run_id` in a local of its own, read with `INFO server` on the
/// first call and kept for the life of the Lua state. A Lua state lives in one server process,
/// and a process's `run_id` never changes, so the kept value is always the current process's:
/// a restart or a failover reaches a process whose state reads it afresh, and `FUNCTION LOAD`
/// (also by replication or a restore) starts a new state. So every call knows which process it
/// runs in at the cost of one `INFO` per process, where a script (`EVAL`) can keep nothing
/// between calls and would pay it on every call.
pub(crate) fn append_library() -> Function {
    let hash = redis::Script::new(APPEND).get_hash().to_owned();
    let name = format!("es_append_{}", &hash[..16]);
    let code = format!(
        "#!lua name={name}
local run_id = nil
local function current_run()
  if not run_id then
    local info = redis.call('INFO', 'server')
    local s = string.find(info, 'run_id:', 1, true)
    run_id = s and string.sub(info, s + 7, s + 46) or ''
  end
  return run_id
end
local function append(KEYS, ARGV)
{APPEND}
end
redis.register_function('{name}', append)
"
    );
    Function { name, code }
}

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

/// A Redis function (Redis 7), alone in a library of the same name: loaded with `FUNCTION LOAD`
/// when the server does not hold it, called with `FCALL`.
#[derive(Debug)]
pub(crate) struct Function {
    name: String,
    code: String,
}

impl Function {
    /// An `FCALL` command with room for `num_keys` keys; the caller adds the keys, then the
    /// arguments.
    pub(crate) fn fcall(&self, num_keys: usize) -> Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.name).arg(num_keys);
        cmd
    }

    /// Whether the server holds the library.
    async fn loaded(&self, conn: &mut ConnectionManager) -> RedisResult<bool> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LIST").arg("LIBRARYNAME").arg(&self.name);
        match query(conn, &cmd).await? {
            Value::Array(libraries) => Ok(!libraries.is_empty()),
            _ => Ok(false),
        }
    }

    /// Loads the library unless the server holds it (`REPLACE`, so that two stores loading it at
    /// once both succeed).
    pub(crate) async fn load(&self, conn: &mut ConnectionManager) -> RedisResult<()> {
        if self.loaded(conn).await? {
            return Ok(());
        }
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(&self.code);
        query(conn, &cmd).await?;
        Ok(())
    }

    /// Runs `cmd` (built by [`Function::fcall`]). If it fails with a plain `ERR` and the server
    /// does not hold the library (`FUNCTION FLUSH`, a restart that lost it with the data), the
    /// library is loaded and the command sent again: a call of a function the server does not
    /// hold did not run. Tries [`NOSCRIPT_RELOADS`] times, as [`Lua::invoke`] does.
    pub(crate) async fn invoke(
        &self,
        conn: &mut ConnectionManager,
        cmd: &Cmd,
    ) -> RedisResult<Value> {
        let mut reloads = 0;
        loop {
            match query(conn, cmd).await {
                Err(err) if err.code() == Some("ERR") && reloads < NOSCRIPT_RELOADS => {
                    if self.loaded(conn).await? {
                        return Err(err);
                    }
                    reloads += 1;
                    tracing::debug!(function = %self.name, reloads, "function missing on the server; loading it");
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
