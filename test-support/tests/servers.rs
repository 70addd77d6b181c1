//! The server helpers start, crash and restart real servers.

use es_test_support::{port_open, scratch_dir, PgServer, RedisServer};

#[test]
fn postgres_starts_survives_kill9_and_stops() {
    let dir = scratch_dir("support-pg");
    let mut pg = PgServer::start(&dir, &[]).unwrap();
    assert!(port_open(pg.port()));
    pg.kill9().unwrap();
    assert!(!port_open(pg.port()));
    pg.restart().unwrap();
    assert!(port_open(pg.port()));
    let port = pg.port();
    drop(pg);
    assert!(!port_open(port));
}

#[test]
fn redis_starts_survives_kill9_and_stops() {
    let dir = scratch_dir("support-redis");
    let mut redis = RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    assert!(port_open(redis.port()));
    redis.kill9().unwrap();
    assert!(!port_open(redis.port()));
    redis.restart().unwrap();
    assert!(port_open(redis.port()));
    let port = redis.port();
    drop(redis);
    assert!(!port_open(port));
}
