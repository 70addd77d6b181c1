//! The server-side Lua scripts and their invocation (EVALSHA, reloaded on NOSCRIPT).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ErrorKind, RedisResult, ServerErrorKind, Value};

/// The append script. See the crate docs, section "The append script".
///
/// KEYS: 1 the stream's events, 2 its version, 3 the feed, 4 the index hash (head fields and
/// event ids). ARGV: 1 expected version (`any`, `none`, `exists` or a decimal), 2 the stream id,
/// 3 the number of events `n`, then five per event: event id, type, schema version, payload,
/// metadata.
///
/// Id lookups and index writes go to `redis.call` in chunks of 500 events, so that no call exceeds
/// Lua's C stack limit (8000 slots) however large the batch.
///
/// Replies (the first element says which):
/// - `{0, version}` for an empty append, `{0, version, first_position}` otherwise;
/// - `{1, ref...}`: some event ids are stored already, nothing was written; one element per event,
///   nil or `"<position> <version> <stream>"`;
/// - `{2, actual}`: the expected version does not match, nothing was written;
/// - `{3, what}`: a key holds data the store did not write, nothing was written.
pub(crate) const APPEND: &str = r"
local n = tonumber(ARGV[3])
local base = 3

-- 1. Idempotency: look every event id up, and read the head, before anything else.
local function ids(first, last)
  local list = {}
  for i = first, last do list[#list + 1] = ARGV[base + (i - 1) * 5 + 1] end
  return list
end
local found = redis.call('HMGET', KEYS[4], 'position', 'recorded_at',
  unpack(ids(1, math.min(n, 500))))
local pos = tonumber(found[1] or '0')
local last_at = tonumber(found[2] or '0')
local any = false
for i = 1, math.min(n, 500) do
  if found[i + 2] then any = true end
end
for first = 501, n, 500 do
  local last = math.min(first + 499, n)
  local got = redis.call('HMGET', KEYS[4], unpack(ids(first, last)))
  for j = 1, last - first + 1 do
    found[first + j + 1] = got[j]
    if got[j] then any = true end
  end
end
if any then
  local reply = {1}
  for i = 1, n do reply[i + 1] = found[i + 2] end
  return reply
end

-- 2. The expected version, checked against the version key.
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur == nil then return {3, 'version'} end
local expected = ARGV[1]
local ok
if expected == 'any' then ok = true
elseif expected == 'none' then ok = cur == 0
elseif expected == 'exists' then ok = cur > 0
else ok = cur == tonumber(expected) end
if not ok then return {2, cur} end
if n == 0 then return {0, cur} end

-- 3. Validate everything the writes depend on, so that no write can fail half-way.
if pos == nil or last_at == nil then return {3, 'head'} end
if #redis.call('XRANGE', KEYS[1], string.format('%d', cur + 1), '+', 'COUNT', 1) > 0 then
  return {3, 'events'}
end
if #redis.call('XRANGE', KEYS[3], string.format('%d', pos + 1), '+', 'COUNT', 1) > 0 then
  return {3, 'feed'}
end

-- 4. The server clock, in microseconds, never behind the previous append.
local time = redis.call('TIME')
local at = tonumber(time[1]) * 1000000 + tonumber(time[2])
if at < last_at then at = last_at end
at = string.format('%d', at)

-- 5. Write: per-stream entries, feed entries, then the head and id index, then the version.
local stream = ARGV[2]
local index = {'position', string.format('%d', pos + n), 'recorded_at', at}
for i = 1, n do
  local a = base + (i - 1) * 5
  local v = string.format('%d', cur + i)
  local p = string.format('%d', pos + i)
  redis.call('XADD', KEYS[1], v .. '-0',
    'event_id', ARGV[a + 1], 'type', ARGV[a + 2], 'schema', ARGV[a + 3],
    'payload', ARGV[a + 4], 'metadata', ARGV[a + 5], 'position', p, 'recorded_at', at)
  redis.call('XADD', KEYS[3], p .. '-0',
    'stream', stream, 'version', v,
    'event_id', ARGV[a + 1], 'type', ARGV[a + 2], 'schema', ARGV[a + 3],
    'payload', ARGV[a + 4], 'metadata', ARGV[a + 5], 'recorded_at', at)
  index[#index + 1] = ARGV[a + 1]
  index[#index + 1] = p .. ' ' .. v .. ' ' .. stream
  if #index >= 1000 or i == n then
    redis.call('HSET', KEYS[4], unpack(index))
    index = {}
  end
end
redis.call('SET', KEYS[2], string.format('%d', cur + n))
return {0, cur + n, pos + 1}
";

/// The snapshot script: upsert-if-newer.
///
/// KEYS: 1 the snapshot hash. ARGV: version, schema version, payload, `recorded_at` (µs).
/// Replies 1 if written, 0 if a snapshot at the same or a newer version is stored.
pub(crate) const SAVE_SNAPSHOT: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '')
if stored ~= nil and stored >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'schema', ARGV[2], 'payload', ARGV[3],
  'recorded_at', ARGV[4])
return 1
";

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
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
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
    /// `SCRIPT FLUSH`, failover) it is loaded and the command sent once more. A NOSCRIPT reply
    /// means the script did not run, so resending cannot apply it twice.
    pub(crate) async fn invoke(
        &self,
        conn: &mut ConnectionManager,
        cmd: &Cmd,
    ) -> RedisResult<Value> {
        match query(conn, cmd).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                tracing::debug!(sha = %self.sha, "script missing on the server; loading it");
                self.load(conn).await?;
                query(conn, cmd).await
            }
            other => other,
        }
    }
}

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
