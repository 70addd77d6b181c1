//! The server-side Lua scripts and their invocation (EVALSHA, reloaded on NOSCRIPT).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};

use crate::conn::Connection;

/// The append function's body: applies a group of appends, each to one stream, in order,
/// atomically as a whole, each with its own outcome. See the crate docs, sections "The append
/// script", "Group commit" and "Epochs and lost tails". It runs as a Redis function (see
/// [`library`]), with `KEYS` and `ARGV` as its parameters and `current_run` from the
/// library.
///
/// KEYS: 1 the feed, 2 the index hash (head fields and event ids), 3 the outbox, 4 the epoch
/// history, then three per append: the stream's events, its version, its closed key (the
/// tombstone's version, once closed).
/// ARGV: 1 the number of appends `m`, 2 the highest position the calling handle has seen (its
/// floor), 3 the mode: `0`, or `1` if the store allows an evicting server, plus 2 for an
/// all-or-nothing call (a multi-stream append: every append is checked before the first write,
/// and nothing is written unless every one passes), then per append: expected
/// version (`any`, `none`, `exists` or a decimal), stream id, number of events `n`, number of
/// outbox messages `k`, five per event (event id, type, schema version, payload, metadata) and
/// eight per message (message id, source event id, topic, key, type, schema version, payload,
/// metadata).
///
/// Lists handed to `unpack` (id lookups, index and version writes) go to `redis.call` in chunks of
/// 500 keys or 1000 arguments, so that no call exceeds Lua's C stack limit (8000 slots) however
/// large the group.
///
/// The code lives in `script/append.lua`; its reply codes and expected-version modes are named
/// there and in [`crate::protocol`] ([`AppendCode`](crate::protocol::AppendCode),
/// [`ExpectedMode`](crate::protocol::ExpectedMode)).
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
/// - `4, error, nil`: the server refused the append's first write (out of memory, or a command
///   the user may not run), nothing was written;
/// - `5, policy, nil`: this is the first write of a new server incarnation and the server's
///   `maxmemory-policy` can evict the store's keys, nothing was written;
/// - `6, what, nil`: the append would take a position or outbox position above 2^53 - 1 (an
///   epoch above [`MAX_EPOCH`](es_core::contract::position::MAX_EPOCH)), nothing was written;
/// - `7, version, nil` (all-or-nothing calls only): this append passed its checks, but another
///   did not, so nothing of the call was written;
/// - `8, version, nil`: the stream is closed (its closed key holds its tombstone's `version`,
///   set by the append whose last event was the tombstone, or by an earlier append of this
///   call), nothing was written. Checked after the event ids and before the expected version.
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
/// The script is written for the cost model of Redis' Lua: every table it creates costs about as
/// much as a small Redis command, index entries hold just the position, and the replies are one
/// flat table. Integers go to `redis.call` as strings formatted with `string.format('%d', n)`:
/// given a Lua number, Redis 7.0 formats it with printf's `%.17g`, whose multi-precision path cost
/// about a third of the server's time per event in 100-event appends (measured with `perf`:
/// 17.2 µs of server CPU per event before, 12.0 µs after).
pub(crate) const APPEND: &str = include_str!("script/append.lua");

/// The functions of consumer-group leases ([`es_core::contract::LeaseStore`]), in the store's
/// library beside the append function: each lease call is one `FCALL` of one of them, on the
/// group's two keys ([`GroupKeys`](crate::GroupKeys): the leases hash and the index of held
/// leases, in one hash slot), atomic, on the server clock (`TIME`, milliseconds). Each replies
/// `{code, data}` ([`LeaseCode`](crate::protocol::LeaseCode)).
///
/// - `es_lease_acquire_<hash>`: KEYS the leases hash and the index; ARGV the lease name, the
///   owner, the time to live in ms and `1` if the store allows a server that can evict its
///   keys (else `0`). Takes a lease that is free, released or expired (its generation + 1,
///   whoever held it) or renews one the owner holds (same generation), until now + ttl.
///   Replies `OK, generation`; `REFUSED, holder` if another owner holds it; `CORRUPT, name` if
///   the stored lease is not `<generation> <expires> <owner>`; `EVICTING, policy` if the
///   server's `maxmemory-policy` can evict keys without an expiry (checked on every call, from
///   `INFO memory`), writing nothing in either case.
/// - `es_lease_release_<hash>`: the same KEYS; ARGV the name, the owner, the generation. Ends
///   the lease (expiry 0, generation kept) if the owner holds it in that generation: `OK,
///   generation`; otherwise writes nothing and replies `REFUSED`.
/// - `es_leases_held_<hash>` (flag `no-writes`): the same KEYS. Replies `OK` and, per lease
///   held now (expiry after now), its name, owner and generation, in no particular order.
pub(crate) const LEASE: &str = include_str!("script/lease.lua");

/// The store's function library: the append function ([`APPEND`]) and the lease functions
/// ([`LEASE`]), in one library named `es_append_<hash>` (the hash is of the library's code, so
/// that two versions of this crate on one server do not replace each other's). Its functions
/// are `es_append_<hash>`, `es_lease_acquire_<hash>`, `es_lease_release_<hash>` and
/// `es_leases_held_<hash>`.
///
/// The library keeps the server's `run_id` in a local of its own, read with `INFO server` on the
/// first call and kept for the life of the Lua state. A Lua state lives in one server process,
/// and a process's `run_id` never changes, so the kept value is always the current process's:
/// a restart or a failover reaches a process whose state reads it afresh, and `FUNCTION LOAD`
/// (also by replication or a restore) starts a new state. So every call knows which process it
/// runs in at the cost of one `INFO` per process, where a script (`EVAL`) can keep nothing
/// between calls and would pay it on every call.
pub(crate) fn library() -> Functions {
    let template = format!(
        "#!lua name=es_append_@HASH@
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
{LEASE}
redis.register_function('es_append_@HASH@', append)
redis.register_function('es_lease_acquire_@HASH@', lease_acquire)
redis.register_function('es_lease_release_@HASH@', lease_release)
redis.register_function{{function_name = 'es_leases_held_@HASH@', callback = leases_held,
  flags = {{'no-writes'}}}}
"
    );
    let hash = redis::Script::new(&template).get_hash().to_owned();
    let hash = &hash[..16];
    let library = Arc::new(Library {
        name: format!("es_append_{hash}"),
        code: template.replace("@HASH@", hash),
    });
    let function = |name: &str| Function {
        name: format!("{name}_{hash}"),
        library: Arc::clone(&library),
    };
    Functions {
        append: function("es_append"),
        lease_acquire: function("es_lease_acquire"),
        lease_release: function("es_lease_release"),
        leases_held: function("es_leases_held"),
        library,
    }
}

/// The store's library and its functions; see [`library`].
#[derive(Debug)]
pub(crate) struct Functions {
    pub(crate) library: Arc<Library>,
    pub(crate) append: Function,
    pub(crate) lease_acquire: Function,
    pub(crate) lease_release: Function,
    pub(crate) leases_held: Function,
}

/// The snapshot script: upsert-if-newer.
///
/// KEYS: 1 the snapshot hash. ARGV: version, schema version, payload, `recorded_at` (µs), the
/// id of the event at the version (empty if unknown).
/// Replies 1 if written, 0 if a snapshot at the same or a newer version is stored.
pub(crate) const SAVE_SNAPSHOT: &str = include_str!("script/save_snapshot.lua");

/// The snapshot deleted if it is at the given version (a newer one saved meanwhile stays).
///
/// KEYS: 1 the snapshot hash. ARGV: version. Replies 1 if deleted, 0 otherwise.
pub(crate) const DELETE_SNAPSHOT: &str = include_str!("script/delete_snapshot.lua");

/// The layout check: records the requested layout in the meta key if the store has none, and
/// returns the recorded one.
///
/// KEYS: 1 the meta hash, 2 the classic layout's index hash (a store from before layouts were
/// recorded has its head there). ARGV: 1 the requested layout (`<layout>/<partitions>`).
pub(crate) const CHECK_LAYOUT: &str = include_str!("script/check_layout.lua");

/// Deletes archived events from hot storage, atomically, for
/// [`EventStore::archive_stream`](es_core::EventStore::archive_stream): per event still in
/// hot storage, its stream entry (`XDEL`), its feed entry (`XDEL` by position) and its event-id
/// index field (`HDEL`); never a stream's last event. The events were stored in the archive
/// before. Checks the user's rights to the commands it writes with before its first write.
///
/// KEYS: 1 the stream's events, 2 its version, 3 the feed of its partition, 4 the index hash.
/// ARGV: per event, its version, position and event id. Replies the number deleted.
pub(crate) const ARCHIVE: &str = include_str!("script/archive.lua");

/// The store's identity towards its event archive: a random id recorded in the meta hash
/// (`archive_id`) on first use. KEYS: 1 the meta hash. ARGV: 1 a fresh id. Replies the id.
pub(crate) const ARCHIVE_OWNER: &str = include_str!("script/archive_owner.lua");

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
    pub(crate) async fn load(&self, conn: &mut Connection) -> RedisResult<()> {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(self.source)
            .query_async(conn)
            .await?;
        debug_assert_eq!(sha, self.sha);
        Ok(())
    }

    /// Loads the script on the server `cmd` goes to (on a cluster, the primary serving its
    /// first key; elsewhere the one server).
    async fn load_where(&self, conn: &mut Connection, cmd: &Cmd) -> RedisResult<()> {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(self.source);
        match conn.query_where(&load, cmd).await? {
            Value::ServerError(err) => Err(err.into()),
            _ => Ok(()),
        }
    }

    /// Runs `cmd` (built by [`Lua::command`]); if the server has lost the script (restart,
    /// `SCRIPT FLUSH`, failover) it is loaded and the command sent again. A NOSCRIPT reply
    /// means the script did not run, so resending cannot apply it twice. The cache can be
    /// flushed again between the load and the resend (another client's `SCRIPT FLUSH`), so this
    /// tries [`NOSCRIPT_RELOADS`] times before giving up with the NOSCRIPT error.
    pub(crate) async fn invoke(&self, conn: &mut Connection, cmd: &Cmd) -> RedisResult<Value> {
        let mut reloads = 0;
        loop {
            match query(conn, cmd).await {
                Err(err)
                    if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && reloads < NOSCRIPT_RELOADS =>
                {
                    reloads += 1;
                    tracing::debug!(sha = %self.sha, reloads, "script missing on the server; loading it");
                    self.load_where(conn, cmd).await?;
                }
                other => return other,
            }
        }
    }
}

/// A Redis function library (Redis 7): loaded with `FUNCTION LOAD` when the server does not
/// hold it.
#[derive(Debug)]
pub(crate) struct Library {
    name: String,
    code: String,
}

impl Library {
    /// The library's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn list(&self) -> Cmd {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LIST").arg("LIBRARYNAME").arg(&self.name);
        cmd
    }

    fn load_command(&self) -> Cmd {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(&self.code);
        cmd
    }

    /// Whether the server holds the library; on a cluster, whether every primary does.
    pub(crate) async fn loaded(&self, conn: &mut Connection) -> RedisResult<bool> {
        let replies = conn.query_every_primary(&self.list()).await?;
        Ok(!replies.is_empty()
            && replies
                .iter()
                .all(|reply| matches!(reply, Value::Array(libraries) if !libraries.is_empty())))
    }

    /// Loads the library (`FUNCTION LOAD REPLACE`, so that two stores loading it at once both
    /// succeed); on a cluster, on every primary.
    pub(crate) async fn install(&self, conn: &mut Connection) -> RedisResult<()> {
        conn.query_every_primary(&self.load_command()).await?;
        Ok(())
    }

    /// Whether the server `cmd` goes to (on a cluster, the primary serving its first key)
    /// holds the library.
    async fn loaded_where(&self, conn: &mut Connection, cmd: &Cmd) -> RedisResult<bool> {
        match conn.query_where(&self.list(), cmd).await? {
            Value::ServerError(err) => Err(err.into()),
            Value::Array(libraries) => Ok(!libraries.is_empty()),
            _ => Ok(false),
        }
    }

    /// Loads the library on the server `cmd` goes to, unless it holds it: after a call there
    /// found it missing (a primary that never had it, a restart that lost it).
    async fn load_where(&self, conn: &mut Connection, cmd: &Cmd) -> RedisResult<()> {
        if self.loaded_where(conn, cmd).await? {
            return Ok(());
        }
        match conn.query_where(&self.load_command(), cmd).await? {
            Value::ServerError(err) => Err(err.into()),
            _ => Ok(()),
        }
    }
}

/// A function of the store's [`Library`], called with `FCALL`.
#[derive(Debug)]
pub(crate) struct Function {
    name: String,
    library: Arc<Library>,
}

impl Function {
    /// An `FCALL` command with room for `num_keys` keys; the caller adds the keys, then the
    /// arguments.
    pub(crate) fn fcall(&self, num_keys: usize) -> Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.name).arg(num_keys);
        cmd
    }

    /// Runs `cmd` (built by [`Function::fcall`]). If it fails with a plain `ERR` and the server
    /// does not hold the library (`FUNCTION FLUSH`, a restart that lost it with the data), the
    /// library is loaded and the command sent again: a call of a function the server does not
    /// hold did not run. Tries [`NOSCRIPT_RELOADS`] times, as [`Lua::invoke`] does.
    pub(crate) async fn invoke(&self, conn: &mut Connection, cmd: &Cmd) -> RedisResult<Value> {
        let mut reloads = 0;
        loop {
            match query(conn, cmd).await {
                Err(err) if err.code() == Some("ERR") && reloads < NOSCRIPT_RELOADS => {
                    if self.library.loaded_where(conn, cmd).await? {
                        return Err(err);
                    }
                    reloads += 1;
                    tracing::debug!(function = %self.name, reloads, "function missing on the server; loading it");
                    self.library.load_where(conn, cmd).await?;
                }
                other => return other,
            }
        }
    }
}

impl Function {
    /// Runs `cmd` (built by [`Function::fcall`]) as [`Function::invoke`] does, followed on the
    /// same connection, in one pipeline, by `SET <fence> 1` and `WAIT <replicas> <timeout>`:
    /// the reply and the number of replicas that acknowledged every write of the connection up
    /// to the fence (so also a write an idempotent retry found stored: it came before the fence).
    pub(crate) async fn invoke_then_wait(
        &self,
        conn: &mut Connection,
        cmd: &Cmd,
        fence: &str,
        replicas: usize,
        timeout: Duration,
    ) -> RedisResult<(Value, i64)> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone())
            .cmd("SET")
            .arg(fence)
            .arg(1)
            .cmd("WAIT")
            .arg(replicas)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let mut reloads = 0;
        loop {
            let mut replies = conn.req_packed_commands(&pipe, 0, 3).await?.into_iter();
            let (reply, _fence, wait) = (replies.next(), replies.next(), replies.next());
            match reply {
                Some(Value::ServerError(err)) => {
                    let err = RedisError::from(err);
                    if err.code() == Some("ERR") && reloads < NOSCRIPT_RELOADS {
                        if self.library.loaded_where(conn, cmd).await? {
                            return Err(err);
                        }
                        reloads += 1;
                        self.library.load_where(conn, cmd).await?;
                        continue;
                    }
                    return Err(err);
                }
                Some(reply) => {
                    return match wait {
                        Some(Value::Int(acked)) => Ok((reply, acked)),
                        Some(Value::ServerError(err)) => Err(err.into()),
                        other => Err(RedisError::from((
                            ErrorKind::Parse,
                            "unexpected reply to WAIT",
                            format!("{other:?}"),
                        ))),
                    };
                }
                None => {
                    return Err(RedisError::from((
                        ErrorKind::Parse,
                        "no reply to the append function",
                    )))
                }
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
pub(crate) async fn query(conn: &mut Connection, cmd: &Cmd) -> RedisResult<Value> {
    match conn.req_packed_command(cmd).await? {
        Value::ServerError(err) => Err(err.into()),
        value => Ok(value),
    }
}
