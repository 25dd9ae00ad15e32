//! One suite for every state engine: the embedded memory engine (with and without its
//! journal) and Redis (a real `redis-server` per test). Whatever the gate and the media path
//! rely on must hold the same on each.

mod common;

use std::sync::Arc;
use std::time::Duration;

use call_proxy::config::{Settings, StoreKind};
use call_proxy::store::{self, OperatorSession, StateStore};
use common::RedisServer;

/// An engine under test, with whatever keeps it alive.
struct Engine {
    store: Arc<dyn StateStore>,
    /// Whether its TTLs run on the runtime's clock (paused in its tests), or on Redis's.
    paused: bool,
    _redis: Option<RedisServer>,
    _dir: Option<tempfile::TempDir>,
}

fn memory() -> Engine {
    let mut s = Settings::defaults().store;
    s.path.clear();
    Engine {
        store: store::from_settings(&s).unwrap(),
        paused: true,
        _redis: None,
        _dir: None,
    }
}

fn journaled() -> Engine {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::defaults().store;
    s.path = dir.path().join("state.log").to_string_lossy().into_owned();
    Engine {
        store: store::from_settings(&s).unwrap(),
        paused: true,
        _redis: None,
        _dir: Some(dir),
    }
}

fn redis() -> Engine {
    let server = RedisServer::start();
    let mut s = Settings::defaults().store;
    s.kind = StoreKind::Redis;
    s.redis_url = server.url();
    s.key_prefix = "suite".into();
    Engine {
        store: store::from_settings(&s).unwrap(),
        paused: false,
        _redis: Some(server),
        _dir: None,
    }
}

impl Engine {
    /// Lets `d` pass: on the paused runtime clock in an instant, on Redis's in real time.
    async fn pass(&self, d: Duration) {
        if self.paused {
            tokio::time::advance(d).await;
        } else {
            tokio::time::sleep(d).await;
        }
    }
}

async fn attempts_count_clear_and_expire(e: Engine) {
    let s = e.store.clone();
    let ttl = Duration::from_secs(60);
    assert_eq!(s.attempts("+1").await.unwrap(), None);
    for n in 1..=3 {
        assert_eq!(s.record_failure("+1", ttl).await.unwrap(), n);
    }
    assert_eq!(s.attempts("+1").await.unwrap(), Some(3));
    assert_eq!(s.attempts("+2").await.unwrap(), None, "per caller");
    s.clear_attempts("+1").await.unwrap();
    assert_eq!(s.attempts("+1").await.unwrap(), None);
    s.clear_attempts("+never").await.unwrap();

    s.record_failure("+3", Duration::from_secs(1))
        .await
        .unwrap();
    e.pass(Duration::from_millis(2100)).await;
    assert_eq!(s.attempts("+3").await.unwrap(), None, "expired");
    assert_eq!(
        s.record_failure("+3", ttl).await.unwrap(),
        1,
        "counted afresh"
    );
}

/// Runs `op` on `n` tasks at once; answers what each answered, sorted.
async fn at_once<T, F, Fut>(s: &Arc<dyn StateStore>, n: usize, op: F) -> Vec<T>
where
    T: Ord + Send + 'static,
    F: Fn(Arc<dyn StateStore>) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(op(s.clone()))).collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen.sort_unstable();
    seen
}

async fn concurrent_failures_each_count(e: Engine) {
    let s = e.store;
    let seen = at_once(&s, 100, |s| async move {
        s.record_failure("+4", Duration::from_secs(60))
            .await
            .unwrap()
    })
    .await;
    assert_eq!(seen, (1..=100).collect::<Vec<u64>>());
    assert_eq!(s.attempts("+4").await.unwrap(), Some(100));
}

async fn blocks_hold_list_and_lift(e: Engine) {
    let s = e.store;
    assert_eq!(s.blocked("+5").await.unwrap(), None);
    s.record_failure("+5", Duration::from_secs(60))
        .await
        .unwrap();
    let b = s.block("+5", None, "a test").await.unwrap();
    assert_eq!(b.caller, "+5");
    assert_eq!(b.expires_at, None);
    assert_eq!(s.blocked("+5").await.unwrap(), Some(b.clone()));
    let again = s
        .block("+5", Some(Duration::from_secs(1)), "a test")
        .await
        .unwrap();
    assert_eq!(again, b, "an existing block is kept as it is");
    s.block("+6", None, "a test").await.unwrap();
    let mut listed: Vec<String> = s
        .blocks()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.caller)
        .collect();
    listed.sort();
    assert_eq!(listed, ["+5", "+6"]);
    assert!(s.unblock("+5").await.unwrap());
    assert_eq!(
        s.attempts("+5").await.unwrap(),
        None,
        "unblocking clears attempts"
    );
    assert!(!s.unblock("+5").await.unwrap());
    assert_eq!(s.blocked("+5").await.unwrap(), None);

    let t = s
        .block("+7", Some(Duration::from_secs(1)), "a test")
        .await
        .unwrap();
    assert!(t.expires_at.is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        s.blocked("+7").await.unwrap(),
        None,
        "a block with a TTL ends"
    );
    assert!(s.blocks().await.unwrap().iter().all(|b| b.caller != "+7"));
}

async fn many_blocks_are_all_listed(e: Engine) {
    let s = e.store;
    for i in 0..1200 {
        s.block(&format!("+1555{i:07}"), None, "a test")
            .await
            .unwrap();
    }
    assert_eq!(s.blocks().await.unwrap().len(), 1200);
}

async fn executions_live_refresh_and_end(e: Engine) {
    let s = e.store.clone();
    let ttl = Duration::from_millis(800);
    assert!(!s.execution_is_live("FN1").await.unwrap());
    s.execution_live("FN1", "MZ1", ttl).await.unwrap();
    s.execution_live("FN1", "MZ2", ttl).await.unwrap();
    assert!(s.execution_is_live("FN1").await.unwrap());
    s.execution_ended("FN1", "MZ1").await.unwrap();
    assert!(
        s.execution_is_live("FN1").await.unwrap(),
        "MZ2 still streams"
    );
    s.execution_ended("FN1", "MZ2").await.unwrap();
    assert!(!s.execution_is_live("FN1").await.unwrap());

    // Refreshed, it stays; left alone (its instance crashed), it expires.
    s.execution_live("FN2", "MZ3", ttl).await.unwrap();
    for _ in 0..3 {
        e.pass(Duration::from_millis(400)).await;
        s.execution_live("FN2", "MZ3", ttl).await.unwrap();
        assert!(s.execution_is_live("FN2").await.unwrap());
    }
    e.pass(Duration::from_millis(1000)).await;
    assert!(!s.execution_is_live("FN2").await.unwrap());
    s.ping().await.unwrap();
}

async fn windows_count_from_their_first_event_and_close(e: Engine) {
    let s = e.store.clone();
    let window = Duration::from_millis(700);
    assert_eq!(s.window("ip:a").await.unwrap(), None);
    let (n, left) = s.count_in_window("ip:a", window).await.unwrap();
    assert_eq!(n, 1);
    assert!(
        left <= window && left > Duration::from_millis(400),
        "{left:?}"
    );
    e.pass(Duration::from_millis(300)).await;
    let (n, left) = s.count_in_window("ip:a", window).await.unwrap();
    assert_eq!(n, 2);
    assert!(
        left <= Duration::from_millis(420),
        "not stretched: {left:?}"
    );
    assert_eq!(s.window("ip:a").await.unwrap().map(|w| w.0), Some(2));
    assert_eq!(s.window("ip:b").await.unwrap(), None);
    e.pass(Duration::from_millis(500)).await;
    assert_eq!(s.window("ip:a").await.unwrap(), None, "closed");
    assert_eq!(s.count_in_window("ip:a", window).await.unwrap().0, 1);
}

async fn windows_and_claims_hold_under_concurrency(e: Engine) {
    let s = e.store;
    let counts = at_once(&s, 50, |s| async move {
        let window = Duration::from_secs(60);
        s.count_in_window("ip:c", window).await.unwrap().0
    })
    .await;
    assert_eq!(counts, (1..=50).collect::<Vec<_>>());
    let takers = at_once(&s, 50, |s| async move {
        s.claim_once("token:z", Duration::from_secs(60))
            .await
            .unwrap()
    })
    .await;
    assert_eq!(
        takers.iter().filter(|taken| **taken).count(),
        1,
        "exactly one of 50 concurrent takers"
    );
}

async fn claims_are_taken_once_until_they_expire(e: Engine) {
    let s = e.store.clone();
    let ttl = Duration::from_millis(500);
    assert!(s.claim_once("token:x", ttl).await.unwrap());
    assert!(!s.claim_once("token:x", ttl).await.unwrap());
    assert!(
        s.claim_once("token:y", ttl).await.unwrap(),
        "keys are apart"
    );
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.claim_once("token:z", Duration::from_secs(60)).await })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap().unwrap());
    }
    assert_eq!(winners, 1, "exactly one of 50 concurrent takers");
    e.pass(Duration::from_millis(600)).await;
    assert!(s.claim_once("token:x", ttl).await.unwrap(), "expired");

    // A note keeps its first writer's value: a later writer changes nothing.
    assert_eq!(s.noted("handoff:MZ1").await.unwrap(), None);
    assert!(s.note_once("handoff:MZ1", "MZ2 1700", ttl).await.unwrap());
    assert!(!s.note_once("handoff:MZ1", "MZ3 1800", ttl).await.unwrap());
    assert_eq!(
        s.noted("handoff:MZ1").await.unwrap().as_deref(),
        Some("MZ2 1700")
    );
    assert!(s.is_claimed("handoff:MZ1").await.unwrap());
    e.pass(Duration::from_millis(600)).await;
    assert_eq!(s.noted("handoff:MZ1").await.unwrap(), None, "expired");
}

async fn executions_refresh_in_one_batch(e: Engine) {
    let s = e.store.clone();
    let ttl = Duration::from_millis(600);
    let live = vec![
        ("FN7".to_string(), "MZ7".to_string()),
        ("FN8".to_string(), "MZ8".to_string()),
    ];
    s.refresh_executions(&live, ttl).await.unwrap();
    for _ in 0..3 {
        e.pass(Duration::from_millis(300)).await;
        s.refresh_executions(&live[..1], ttl).await.unwrap();
    }
    assert!(s.execution_is_live("FN7").await.unwrap(), "refreshed");
    assert!(!s.execution_is_live("FN8").await.unwrap(), "left to expire");
}

async fn a_timed_block_placed_after_an_old_one_expired_keeps_its_expiry(e: Engine) {
    let s = e.store;
    let first = s
        .block("+7", Some(Duration::from_secs(1)), "a test")
        .await
        .unwrap();
    assert!(first.expires_at.is_some());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = s
        .block("+7", Some(Duration::from_secs(1)), "a test")
        .await
        .unwrap();
    assert!(second.expires_at.is_some(), "never a permanent block");
    assert!(s.blocked("+7").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(s.blocked("+7").await.unwrap(), None, "it expired");
}

async fn operator_sessions_open_list_close_and_expire(e: Engine) {
    let s = e.store;
    let now = call_proxy::clock::unix_now();
    let session = |id: &str, opened: u64, lasts: u64| OperatorSession {
        id: id.to_string(),
        opened_at: opened,
        expires_at: now + lasts,
        client: "203.0.113.9".to_string(),
    };
    s.session_open(&session("later", now, 3600)).await.unwrap();
    s.session_open(&session("earlier", now - 60, 3600))
        .await
        .unwrap();
    s.session_open(&session("brief", now, 1)).await.unwrap();
    let ids = |list: Vec<OperatorSession>| list.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let listed = s.sessions().await.unwrap();
    assert_eq!(listed[0], session("earlier", now - 60, 3600), "as written");
    assert_eq!(ids(listed), ["earlier", "brief", "later"], "oldest first");
    assert!(s.session_close("later").await.unwrap());
    assert!(!s.session_close("later").await.unwrap(), "closed once");
    assert!(!s.session_live("later").await.unwrap());
    assert!(s.session_live("earlier").await.unwrap());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(!s.session_live("brief").await.unwrap(), "expired");
    assert_eq!(ids(s.sessions().await.unwrap()), ["earlier"]);
}

macro_rules! suite {
    ($($engine:ident: paused $paused:literal),*) => {
        $(
            mod $engine {
                // TTLs on the runtime's clock are tested on paused time; Redis keeps its own.
                #[tokio::test(start_paused = $paused)]
                async fn attempts_count_clear_and_expire() {
                    super::attempts_count_clear_and_expire(super::$engine()).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn concurrent_failures_each_count() {
                    super::concurrent_failures_each_count(super::$engine()).await
                }
                // Blocks expire on the wall clock (Unix seconds, as every engine stores them).
                #[tokio::test]
                async fn blocks_hold_list_and_lift() {
                    super::blocks_hold_list_and_lift(super::$engine()).await
                }
                #[tokio::test]
                async fn many_blocks_are_all_listed() {
                    super::many_blocks_are_all_listed(super::$engine()).await
                }
                #[tokio::test(start_paused = $paused)]
                async fn executions_live_refresh_and_end() {
                    super::executions_live_refresh_and_end(super::$engine()).await
                }
                #[tokio::test(start_paused = $paused)]
                async fn windows_count_from_their_first_event_and_close() {
                    super::windows_count_from_their_first_event_and_close(super::$engine()).await
                }
                #[tokio::test(start_paused = $paused)]
                async fn claims_are_taken_once_until_they_expire() {
                    super::claims_are_taken_once_until_they_expire(super::$engine()).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn windows_and_claims_hold_under_concurrency() {
                    super::windows_and_claims_hold_under_concurrency(super::$engine()).await
                }
                #[tokio::test(start_paused = $paused)]
                async fn executions_refresh_in_one_batch() {
                    super::executions_refresh_in_one_batch(super::$engine()).await
                }
                #[tokio::test]
                async fn operator_sessions_open_list_close_and_expire() {
                    super::operator_sessions_open_list_close_and_expire(super::$engine()).await
                }
                #[tokio::test]
                async fn a_timed_block_placed_after_an_old_one_expired_keeps_its_expiry() {
                    super::a_timed_block_placed_after_an_old_one_expired_keeps_its_expiry(
                        super::$engine(),
                    )
                    .await
                }
            }
        )*
    };
}

suite!(memory: paused true, journaled: paused true, redis: paused false);

#[tokio::test]
async fn redis_down_is_unavailable_not_a_hang_and_comes_back() {
    let mut server = RedisServer::start();
    let port = server.port;
    let mut s = Settings::defaults().store;
    s.kind = StoreKind::Redis;
    s.redis_url = server.url();
    s.timeout_ms = 300;
    let store = store::from_settings(&s).unwrap();
    store.block("+8", None, "a test").await.unwrap();
    server.stop();
    let began = std::time::Instant::now();
    let err = store.blocked("+8").await.unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
    assert!(store.ping().await.is_err());
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "failed fast: {:?}",
        began.elapsed()
    );

    let _server = RedisServer::start_on(port);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A fresh server: the block is gone with it, but the store works again.
    assert_eq!(store.blocked("+8").await.unwrap(), None);
    store.block("+8", None, "a test").await.unwrap();
}

/// A tmpfs of `size` bytes, mounted for the test and unmounted after; `None` where this
/// machine does not let the tests mount one (not root), said on standard error.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("cannot mount a tmpfs here (not root?): the full-disk test did not run");
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk with a file until a write fails.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 512]).and_then(|_| f.sync_data()).is_ok() {}
        let _ = f.write_all(&[0u8; 1]);
        let _ = f.sync_data();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk changes nothing and tears nothing: a block, an attempt and an unblock that
/// could not be written answer 503 and leave the state as it was; once there is room again
/// the next record is whole, and a restart replays every acknowledged change.
#[tokio::test]
async fn a_full_disk_changes_nothing_and_loses_nothing_acknowledged() {
    let Some(disk) = SmallDisk::mount("64k") else {
        return;
    };
    let path = disk.path().join("state.log");
    let store = store::MemoryStore::open(&path).unwrap();
    let ttl = Duration::from_secs(3600);
    store.block("+15550000001", None, "test").await.unwrap();
    assert_eq!(store.record_failure("+15550000009", ttl).await.unwrap(), 1);

    let filler = disk.fill();
    // The file's last page may still have room: change on until a write meets the full disk.
    // What was acknowledged is kept; the change that failed is not made.
    let mut blocked = vec!["+15550000001".to_string()];
    let refused = loop {
        let caller = format!("+1555{:07}", 1000 + blocked.len());
        match store.block(&caller, None, "test").await {
            Ok(_) => blocked.push(caller),
            Err(_) => break caller,
        }
        assert!(blocked.len() < 10_000, "the disk never filled");
    };
    assert!(
        store.blocked(&refused).await.unwrap().is_none(),
        "not blocked"
    );
    let mut failures = 1;
    while let Ok(n) = store.record_failure("+15550000009", ttl).await {
        failures += 1;
        assert_eq!(n, failures);
    }
    assert_eq!(
        store.attempts("+15550000009").await.unwrap(),
        Some(failures),
        "not counted"
    );
    let mut unblocked = 0;
    let kept = loop {
        let caller = blocked[unblocked].clone();
        match store.unblock(&caller).await {
            Ok(was) => {
                assert!(was);
                unblocked += 1;
            }
            Err(_) => break caller,
        }
    };
    assert!(
        store.blocked(&kept).await.unwrap().is_some(),
        "not unblocked"
    );

    std::fs::remove_file(filler).unwrap();
    store.block("+15550000003", None, "test").await.unwrap();
    assert_eq!(
        store.record_failure("+15550000009", ttl).await.unwrap(),
        failures + 1
    );
    drop(store);

    // A restart: every record whole, every acknowledged change there.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'), "no torn tail: {text:?}");
    let again = store::MemoryStore::open(&path).unwrap();
    for (i, caller) in blocked.iter().enumerate() {
        let expect = i >= unblocked;
        assert_eq!(
            again.blocked(caller).await.unwrap().is_some(),
            expect,
            "{caller}"
        );
    }
    assert!(again.blocked("+15550000003").await.unwrap().is_some());
    assert!(again.blocked(&refused).await.unwrap().is_none());
    assert_eq!(
        again.attempts("+15550000009").await.unwrap(),
        Some(failures + 1)
    );
}
