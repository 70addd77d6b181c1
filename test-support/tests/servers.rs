//! The server helpers start, crash and restart real servers, from any directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use es_test_support::{
    find_postgres, find_redis, is_root, port_open, remove_orphaned_clusters, scratch_dir, PgServer,
    RedisServer, MIN_PG_MAJOR, MIN_REDIS_MAJOR,
};

/// A fresh directory `locked` inside a scratch directory, mode 0700 like root's home or a
/// `mktemp -d` directory: only its owner can enter it.
fn locked_dir(name: &str) -> PathBuf {
    let locked = scratch_dir(name).join("locked");
    fs::create_dir_all(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
    locked
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

#[test]
fn the_programs_are_found_and_recent_enough() {
    let pg = find_postgres().unwrap();
    assert!(pg.major >= MIN_PG_MAJOR, "{pg:?}");
    assert!(pg.bin.join("pg_ctl").is_file(), "{pg:?}");
    let (redis, version) = find_redis().unwrap();
    assert!(redis.is_file());
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    assert!(major >= MIN_REDIS_MAJOR, "{version}");
}

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

/// A directory everyone can pass through (the system's temporary directory) keeps the cluster,
/// also when the server runs as the `postgres` user.
#[test]
fn a_cluster_in_a_directory_its_user_can_enter_stays_there() {
    let dir = std::env::temp_dir().join(format!("es-support-open-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let pg = PgServer::start(&dir, &[]).unwrap();
    let dir = dir.canonicalize().unwrap();
    assert!(port_open(pg.port()));
    assert_eq!(pg.data_dir(), dir.join("data"));
    assert!(!is_symlink(&dir.join("data")));
    assert!(pg.data_dir().join("PG_VERSION").is_file());
    let port = pg.port();
    drop(pg);
    assert!(!port_open(port));
    assert!(dir.join("data/PG_VERSION").is_file(), "the cluster stays");
    fs::remove_dir_all(&dir).unwrap();
}

/// As root, PostgreSQL runs as `postgres`, which cannot enter a 0700 directory of root's: the
/// cluster lives in a directory of its own outside, linked from the chosen one, and is removed
/// with the server, leaving the log. As another user the directory is the user's own.
#[test]
fn a_cluster_in_a_directory_its_user_cannot_enter_works_from_outside() {
    let dir = locked_dir("support-pg-locked").join("pg");
    let mut pg = PgServer::start(&dir, &[]).unwrap();
    let dir = dir.canonicalize().unwrap();
    assert!(port_open(pg.port()));
    let data = pg.data_dir();
    let home = data.parent().unwrap().to_owned();
    assert!(data.join("PG_VERSION").is_file());
    if is_root() {
        assert!(!data.starts_with(&dir), "{} is outside", data.display());
        assert!(is_symlink(&dir.join("data")));
        assert_eq!(fs::read_link(dir.join("data")).unwrap(), data);
        assert_eq!(
            fs::metadata(&home).unwrap().permissions().mode() & 0o777,
            0o700
        );
    } else {
        assert_eq!(data, dir.join("data"));
    }
    pg.kill9().unwrap();
    pg.restart().unwrap();
    assert!(port_open(pg.port()));
    pg.stop().unwrap();
    pg.restart().unwrap();
    let port = pg.port();
    drop(pg);
    assert!(!port_open(port));
    let log = fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(log.contains("database system is ready"), "{log}");
    if is_root() {
        assert!(!home.exists(), "{} removed with the server", home.display());
        assert!(!dir.join("data").exists());
        assert!(
            !is_symlink(&dir.join("server.log")),
            "a copy of the log stays"
        );
    } else {
        assert!(dir.join("data/PG_VERSION").is_file(), "the cluster stays");
    }
}

/// A detached server is stopped, and its files removed wherever they are, by `remove_dir`; one
/// whose directory vanished without that is stopped by `remove_orphaned_clusters`.
#[test]
fn detached_and_orphaned_clusters_are_stopped_and_removed() {
    let locked = locked_dir("support-pg-detached");
    let (port, dir) = PgServer::start(&locked.join("pg"), &[]).unwrap().detach();
    assert!(port_open(port), "a detached server keeps running");
    let data = fs::canonicalize(dir.join("data")).unwrap();
    let removed = remove_orphaned_clusters();
    assert!(
        !removed.contains(&data.parent().unwrap().to_owned()),
        "{removed:?}"
    );
    assert!(port_open(port), "a detached server is no orphan");
    assert!(PgServer::remove_dir(&dir).unwrap(), "it was running");
    assert!(!port_open(port));
    assert!(!dir.exists());
    assert!(!data.exists(), "{} removed", data.display());

    let (port, dir) = PgServer::start(&locked.join("pg2"), &[]).unwrap().detach();
    let data = fs::canonicalize(dir.join("data")).unwrap();
    if is_root() {
        // Its directory is removed behind its back: the cluster outside is an orphan now.
        fs::remove_dir_all(&dir).unwrap();
        let removed = remove_orphaned_clusters();
        assert!(
            removed.contains(&data.parent().unwrap().to_owned()),
            "{removed:?}"
        );
        assert!(!port_open(port));
        assert!(!data.exists());
    } else {
        // Clusters of other users are never outside their directory.
        assert!(data.starts_with(&dir));
        assert!(PgServer::remove_dir(&dir).unwrap());
        assert!(!port_open(port));
    }
}

#[test]
fn a_standby_replicates_from_a_directory_its_user_cannot_enter() {
    let locked = locked_dir("support-pg-standby");
    let primary = PgServer::start(&locked.join("primary"), &[]).unwrap();
    let standby =
        PgServer::start_standby(&primary, &locked.join("standby"), &[("hot_standby", "on")])
            .unwrap();
    assert!(port_open(standby.port()));
    assert!(standby.data_dir().join("standby.signal").is_file());
    let conf = fs::read_to_string(standby.data_dir().join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains(&format!("port={}", primary.port())),
        "the standby follows the primary: {conf}"
    );
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
