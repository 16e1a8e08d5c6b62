// SPDX-License-Identifier: Apache-2.0
//! Opening the SQLite file: permissions, connection settings and schema migrations.

use std::fs::{self, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use crate::{Error, Result};

/// Written into the SQLite header so that we never migrate (and thereby damage) a database that
/// belongs to someone else. ASCII "IRI1".
const APPLICATION_ID: i32 = 0x4952_4931;

/// How long `open` waits for another process to release the file. A restarting provider may
/// overlap briefly with its predecessor; anything longer is a second instance, which must fail.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound for the WAL file after a checkpoint, so a burst of writes does not leave a large
/// file behind forever.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Schema steps; step `i` moves the file from `user_version` `i` to `i + 1`. Append only: a
/// released step must never change, because files in the field have already applied it.
const MIGRATIONS: &[&str] = &[
    // 1: objects, the store revision, events.
    "CREATE TABLE meta (
         key TEXT PRIMARY KEY NOT NULL,
         value INTEGER NOT NULL
     ) STRICT;
     INSERT INTO meta (key, value) VALUES ('revision', 0);
     CREATE TABLE objects (
         kind TEXT NOT NULL,
         id TEXT NOT NULL,
         revision INTEGER NOT NULL,
         created_at INTEGER NOT NULL,
         deleted_at INTEGER NOT NULL,
         data BLOB NOT NULL,
         PRIMARY KEY (kind, id)
     ) STRICT;
     CREATE TABLE events (
         seq INTEGER PRIMARY KEY,
         event_time INTEGER NOT NULL,
         involved_id TEXT NOT NULL,
         data BLOB NOT NULL
     ) STRICT;
     CREATE INDEX events_by_time ON events (event_time);
     CREATE INDEX events_by_involved_id ON events (involved_id);",
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Opens (creating if needed) the store file at `path`, locks it for this process, and brings
/// its schema up to date.
pub(super) fn open(path: &Path) -> Result<Connection> {
    prepare_file(path)?;
    let ctx = |e: rusqlite::Error| open_error(path, e);
    // No CREATE flag: the file exists by now with the right mode, and if it vanished in between
    // we would rather fail than let SQLite create it with the umask's mode. No URI flag: the
    // path is a path, never `file:...?mode=...`.
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(ctx)?;
    conn.busy_timeout(LOCK_TIMEOUT).map_err(ctx)?;
    // EXCLUSIVE before WAL: the WAL index then lives in heap memory instead of a -shm file, and
    // the file stays locked while this process has it open. The in-memory cache is only correct
    // if nobody else writes the file, so a second instance must not get in.
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(ctx)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(ctx)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Internal(format!(
            "store {}: cannot switch to WAL journal mode (got {mode:?})",
            path.display()
        )));
    }
    // FULL fsyncs the WAL on every commit: an acknowledged write survives power loss.
    conn.pragma_update(None, "synchronous", "FULL").map_err(ctx)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(ctx)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(ctx)?;
    // Take the write lock now, so a second instance fails at open rather than at its first write.
    conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;").map_err(ctx)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let ctx = |e: rusqlite::Error| open_error(path, e);
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(ctx)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(ctx)?;
    let foreign = || {
        Error::Internal(format!(
            "store {}: not an IRI store file (application_id {app_id:#x}, user_version {version}); refusing to touch it",
            path.display()
        ))
    };
    if version == 0 {
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
                [],
                |row| row.get(0),
            )
            .map_err(ctx)?;
        if tables > 0 || app_id != 0 {
            return Err(foreign());
        }
    } else if app_id != APPLICATION_ID {
        return Err(foreign());
    }
    let Some(version) = usize::try_from(version).ok().filter(|v| *v <= SCHEMA_VERSION) else {
        return Err(Error::FailedPrecondition(format!(
            "store {}: schema version {version} is newer than this build supports ({SCHEMA_VERSION}); \
             refusing to open it (was it written by a newer release?)",
            path.display()
        )));
    };
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let to = i64::try_from(step + 1).map_err(Error::internal)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ctx)?;
        tx.execute_batch(sql).map_err(ctx)?;
        // Both header fields are written inside the transaction: a crash leaves the file at the
        // previous version with none of this step applied.
        tx.pragma_update(None, "user_version", to).map_err(ctx)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(ctx)?;
        tx.commit().map_err(ctx)?;
        tracing::info!(path = %path.display(), version = to, "store schema migrated");
    }
    Ok(())
}

/// Creates the file with mode 0600 (it may hold ignition data and volume secrets), or tightens
/// an existing one.
fn prepare_file(path: &Path) -> Result<()> {
    let io =
        |what: &str, e: std::io::Error| Error::Internal(format!("store {}: {what}: {e}", path.display()));
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => {
            file.sync_all().map_err(|e| io("sync new file", e))?;
            // Make the new directory entry itself durable, or a power loss could lose the file.
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            fs::File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| io("sync parent directory", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create", e)),
    }
    for file in
        std::iter::once(path.to_path_buf()).chain(["-wal", "-journal"].iter().map(|s| sibling(path, s)))
    {
        let meta = match fs::metadata(&file) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file != path => continue,
            Err(e) => return Err(io("stat", e)),
        };
        if !meta.is_file() {
            return Err(Error::Internal(format!(
                "store {}: not a regular file",
                file.display()
            )));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            tracing::warn!(file = %file.display(), mode = format!("{mode:o}"), "store file readable by others, restricting to 0600");
            fs::set_permissions(&file, Permissions::from_mode(0o600)).map_err(|e| io("chmod 0600", e))?;
        }
    }
    Ok(())
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn open_error(path: &Path, e: rusqlite::Error) -> Error {
    if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) {
        return Error::Unavailable(format!(
            "store {} is locked by another process (is a second instance running?)",
            path.display()
        ));
    }
    Error::Internal(format!("opening store {}: {e}", path.display()))
}
