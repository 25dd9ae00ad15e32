//! The Redis engine: the state every instance behind a load balancer shares.
//!
//! Keys, all under `store.key_prefix`:
//! - `<p>:attempts:<caller>` — failed PINs; INCR and EXPIRE in one MULTI/EXEC round trip;
//! - `<p>:block:<caller>` — a block as JSON, with EX when it has a TTL;
//! - `<p>:exec:<execution>` — a sorted set of the execution's live streams, each scored with
//!   its expiry (ms), the key itself expiring with the last refresh, so a crashed instance's
//!   calls read as gone once their TTL passes.
//!
//! Every command has a deadline; a Redis that is down or slow is `StoreError::Unavailable`
//! (the gate answers 503), and the connection manager reconnects by itself.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use super::{Block, OperatorSession, StateStore, StoreError, StoreFuture};
use crate::clock::{unix_now, unix_now_ms as now_ms};
use crate::config::StoreSettings;

/// Keeps a live block as it is, or writes the new one (with its expiry, when it has one).
/// Answers the block that stands.
static BLOCK_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
        local current = redis.call('GET', KEYS[1])
        if current then return current end
        if tonumber(ARGV[2]) > 0 then
            redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
        else
            redis.call('SET', KEYS[1], ARGV[1])
        end
        return ARGV[1]
        ",
    )
});

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl RedisStore {
    /// Connects lazily: the service starts (and says it is not ready) while Redis is down.
    pub fn new(settings: &StoreSettings) -> redis::RedisResult<RedisStore> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let client = redis::Client::open(settings.redis_url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        Ok(RedisStore {
            conn: ConnectionManager::new_lazy_with_config(client, config)?,
            prefix: settings.key_prefix.clone(),
            timeout,
        })
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    /// Every `<prefix>:<kind>:*` key with its value. SCAN, never KEYS: it does not stall a
    /// busy Redis; keys that expire between the SCAN and the MGET are left out.
    async fn scan_values(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let pattern = format!("{}:{kind}:*", self.prefix);
        let mut conn = self.conn.clone();
        let mut cursor = 0u64;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .call(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut conn),
                )
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        // SCAN may return a key more than once.
        keys.sort();
        keys.dedup();
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let values: Vec<Option<String>> = self
                .call(redis::cmd("MGET").arg(chunk).query_async(&mut conn))
                .await?;
            found.extend(
                chunk
                    .iter()
                    .zip(values)
                    .filter_map(|(k, v)| Some((k.clone(), v?))),
            );
        }
        Ok(found)
    }

    /// Runs one round trip under the deadline.
    async fn call<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis: {e}"))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    fn decode_block(json: &str) -> Result<Block, StoreError> {
        serde_json::from_str(json)
            .map_err(|e| StoreError::Unavailable(format!("unreadable block record: {e}")))
    }
}

impl StateStore for RedisStore {
    fn record_failure<'a>(&'a self, caller: &'a str, ttl: Duration) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let key = self.key("attempts", caller);
            let mut conn = self.conn.clone();
            let (n,): (u64,) = self
                .call(
                    redis::pipe()
                        .atomic()
                        .incr(&key, 1u64)
                        .expire(&key, ttl.as_secs().max(1) as i64)
                        .ignore()
                        .query_async(&mut conn),
                )
                .await?;
            Ok(n)
        })
    }

    fn attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.call(conn.get(self.key("attempts", caller))).await
        })
    }

    fn clear_attempts<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.call(conn.del::<_, ()>(self.key("attempts", caller)))
                .await
        })
    }

    fn block<'a>(
        &'a self,
        caller: &'a str,
        ttl: Option<Duration>,
        reason: &'a str,
    ) -> StoreFuture<'a, Block> {
        Box::pin(async move {
            let key = self.key("block", caller);
            let now = unix_now();
            let fresh = Block::placed(caller, now, ttl, reason);
            let json = serde_json::to_string(&fresh).expect("blocks serialize");
            let ttl = ttl.map(|t| t.as_secs().max(1)).unwrap_or(0);
            let mut conn = self.conn.clone();
            // One script, so an old block expiring between a look and a write can never leave
            // a timed block without its expiry.
            let stored: String = self
                .call(
                    BLOCK_SCRIPT
                        .key(&key)
                        .arg(&json)
                        .arg(ttl)
                        .invoke_async(&mut conn),
                )
                .await?;
            if stored == json {
                Ok(fresh)
            } else {
                Self::decode_block(&stored)
            }
        })
    }

    fn unblock<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (blocks, _attempts): (u64, u64) = self
                .call(
                    redis::pipe()
                        .atomic()
                        .del(self.key("block", caller))
                        .del(self.key("attempts", caller))
                        .query_async(&mut conn),
                )
                .await?;
            Ok(blocks > 0)
        })
    }

    fn blocked<'a>(&'a self, caller: &'a str) -> StoreFuture<'a, Option<Block>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let json: Option<String> = self.call(conn.get(self.key("block", caller))).await?;
            json.as_deref().map(Self::decode_block).transpose()
        })
    }

    fn blocks(&self) -> StoreFuture<'_, Vec<Block>> {
        Box::pin(async move {
            let mut blocks = Vec::new();
            for (_, json) in self.scan_values("block").await? {
                blocks.push(Self::decode_block(&json)?);
            }
            super::sort_blocks(&mut blocks);
            Ok(blocks)
        })
    }

    fn execution_live<'a>(
        &'a self,
        execution_id: &'a str,
        stream_sid: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = self.key("exec", execution_id);
            let now = now_ms();
            let ttl_ms = ttl.as_millis().max(1) as u64;
            let mut conn = self.conn.clone();
            self.call(
                redis::pipe()
                    .atomic()
                    .zrembyscore(&key, "-inf", now)
                    .ignore()
                    .zadd(&key, stream_sid, now + ttl_ms)
                    .ignore()
                    .pexpire(&key, ttl_ms as i64)
                    .ignore()
                    .query_async::<()>(&mut conn),
            )
            .await
        })
    }

    fn execution_ended<'a>(
        &'a self,
        execution_id: &'a str,
        stream_sid: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.call(conn.zrem::<_, _, ()>(self.key("exec", execution_id), stream_sid))
                .await
        })
    }

    fn execution_is_live<'a>(&'a self, execution_id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let live: u64 = self
                .call(conn.zcount(
                    self.key("exec", execution_id),
                    format!("({}", now_ms()),
                    "+inf",
                ))
                .await?;
            Ok(live > 0)
        })
    }

    fn refresh_executions<'a>(
        &'a self,
        live: &'a [(String, String)],
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let now = now_ms();
            let ttl_ms = ttl.as_millis().max(1) as u64;
            let mut pipe = redis::pipe();
            for (execution, stream) in live {
                let key = self.key("exec", execution);
                pipe.zrembyscore(&key, "-inf", now)
                    .ignore()
                    .zadd(&key, stream, now + ttl_ms)
                    .ignore()
                    .pexpire(&key, ttl_ms as i64)
                    .ignore();
            }
            let mut conn = self.conn.clone();
            self.call(pipe.query_async::<()>(&mut conn)).await
        })
    }

    fn count_in_window<'a>(
        &'a self,
        key: &'a str,
        window: Duration,
    ) -> StoreFuture<'a, (u64, Duration)> {
        Box::pin(async move {
            let key = self.key("window", key);
            let window_ms = window.as_millis().max(1) as u64;
            let mut conn = self.conn.clone();
            // The window opens with the first event (SET NX PX) and is not stretched by later
            // ones; INCR and PTTL read it in the same round trip.
            let (n, left_ms): (u64, i64) = self
                .call(
                    redis::pipe()
                        .atomic()
                        .cmd("SET")
                        .arg(&key)
                        .arg(0)
                        .arg("NX")
                        .arg("PX")
                        .arg(window_ms)
                        .ignore()
                        .incr(&key, 1u64)
                        .pttl(&key)
                        .query_async(&mut conn),
                )
                .await?;
            Ok((n, Duration::from_millis(left_ms.max(0) as u64)))
        })
    }

    fn window<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(u64, Duration)>> {
        Box::pin(async move {
            let key = self.key("window", key);
            let mut conn = self.conn.clone();
            let (n, left_ms): (Option<u64>, i64) = self
                .call(
                    redis::pipe()
                        .atomic()
                        .get(&key)
                        .pttl(&key)
                        .query_async(&mut conn),
                )
                .await?;
            Ok(n.filter(|_| left_ms > 0)
                .map(|n| (n, Duration::from_millis(left_ms as u64))))
        })
    }

    fn note_once<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let key = self.key("claim", key);
            let mut conn = self.conn.clone();
            let taken: Option<String> = self
                .call(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(value)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl.as_millis().max(1) as u64)
                        .query_async(&mut conn),
                )
                .await?;
            Ok(taken.is_some())
        })
    }

    fn noted<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.call(conn.get(self.key("claim", key))).await
        })
    }

    fn session_open<'a>(&'a self, session: &'a OperatorSession) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let json = serde_json::to_string(session).expect("a session serializes");
            let ttl = session.expires_at.saturating_sub(unix_now()).max(1);
            let mut conn = self.conn.clone();
            self.call(
                redis::cmd("SET")
                    .arg(self.key("session", &session.id))
                    .arg(json)
                    .arg("EX")
                    .arg(ttl)
                    .query_async::<()>(&mut conn),
            )
            .await
        })
    }

    fn session_live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let n: u64 = self.call(conn.exists(self.key("session", id))).await?;
            Ok(n > 0)
        })
    }

    fn sessions(&self) -> StoreFuture<'_, Vec<OperatorSession>> {
        Box::pin(async move {
            let prefix = format!("{}:session:", self.prefix);
            let mut sessions: Vec<OperatorSession> = self
                .scan_values("session")
                .await?
                .into_iter()
                .map(|(key, json)| {
                    // A session written by an older build holds no record; it is listed (and
                    // so can be revoked) with what its key says.
                    serde_json::from_str(&json).unwrap_or_else(|_| OperatorSession {
                        id: key.strip_prefix(&prefix).unwrap_or(&key).to_string(),
                        opened_at: 0,
                        expires_at: 0,
                        client: String::new(),
                    })
                })
                .collect();
            super::sort_sessions(&mut sessions);
            Ok(sessions)
        })
    }

    fn session_close<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let n: u64 = self.call(conn.del(self.key("session", id))).await?;
            Ok(n > 0)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let pong: String = self.call(redis::cmd("PING").query_async(&mut conn)).await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(StoreError::Unavailable(format!("redis answered {pong}")))
            }
        })
    }
}
