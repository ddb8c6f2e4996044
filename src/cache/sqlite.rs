//! The on-disk store: one SQLite database per cache folder, in WAL mode, written in batches
//! by a thread of its own, so that no call waits for the disk and several `keg` processes
//! can share one cache at once (SQLite locks the file for them; readers never wait).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::Store;

/// The database in a cache folder. The name carries the layout's version: layout 1 was one
/// file per entry, `<bucket>/<2 hex>/<64 hex>`; layout 2 is this database. A later layout
/// gets a new name rather than a file older builds would misread; layout 1 folders found on
/// open are imported once (see [`import_layout_1`]), so no cached call is lost.
pub const DATABASE: &str = "cache-v2.sqlite";

/// How long a write waits for another process's transaction before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most messages taken into one transaction.
const BATCH: usize = 1024;
/// How long the writer gathers entries before it commits them (a flush commits at once).
/// Keys are random, so each entry lands on its own page of the key index, and a commit
/// writes every page it touched whole (16 KB) to the WAL, and later to the file: entries
/// gathered longer share pages. 25 ms cut the writer's CPU by a third against 5 ms at 512
/// calls in flight (50 ms gained little more). A killed process loses at most this much.
const GATHER: Duration = Duration::from_millis(25);
/// The writer looks at what has gathered this often, and stops gathering once
/// [`GATHER_BYTES`] or [`BATCH`] entries wait: large entries (a document's records) gain
/// nothing from waiting, and would only be held in memory longer.
const GATHER_STEP: Duration = Duration::from_millis(5);
const GATHER_BYTES: usize = 4 << 20;

const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag created by keg.\n# For information about cache directory tags see https://bford.info/cachedir/\n";

const CREATE: &str = "CREATE TABLE IF NOT EXISTS entries (
    bucket TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (bucket, key)
)";
const SELECT: &str = "SELECT value FROM entries WHERE bucket = ?1 AND key = ?2";
/// How often the keys other processes wrote are read in: a key another process wrote less
/// than this long ago may be missed once (its call is sent again, and both replies are valid).
const CATCH_UP: Duration = Duration::from_millis(50);
/// Keys of one bucket known in memory at most (about 40 MB); a bigger bucket is looked up in
/// the database key by key.
const MAX_KNOWN: usize = 2_000_000;
const UPSERT: &str = "INSERT OR REPLACE INTO entries (bucket, key, value) VALUES (?1, ?2, ?3)";

/// Entries in one SQLite database (`<root>/cache-v2.sqlite`), keyed by bucket and blake3
/// key. `put` hands the entry to the writer thread and returns; each batch is one
/// transaction, so a killed process leaves whole entries or none, and loses at most the
/// batch being gathered (calls finished in the last [`GATHER`]).
pub struct DiskStore {
    root: PathBuf,
    path: PathBuf,
    /// Idle read connections: one per thread reading at the same moment.
    readers: Mutex<Vec<Connection>>,
    pending: Arc<Pending>,
    /// Bucket → the keys the database holds, for buckets looked up so far.
    known: Mutex<HashMap<String, Known>>,
    sender: Option<mpsc::Sender<Message>>,
    writer: Option<JoinHandle<()>>,
}

/// The keys one bucket holds, as their first 8 bytes: a lookup of a key the cache does not
/// hold (every call of a new document) is answered here, without a read of the database,
/// which costs more than anything else in a lookup (WAL locks, and pages re-read after every
/// commit). A prefix found here still goes to the database, which has the last word.
struct Known {
    /// `None`: the bucket holds more than [`MAX_KNOWN`] keys; every lookup reads the database.
    prefixes: Option<HashSet<u64>>,
    /// The highest row read in; rows above it were written since.
    through: i64,
    caught_up: Instant,
}

/// Entries handed to the writer and not yet committed, so that `get` sees them at once, and
/// the first write error, reported by the next `put` or `flush`.
#[derive(Default)]
struct Pending {
    /// Bucket → key → (the `put`'s sequence number, the value).
    entries: Mutex<HashMap<String, Bucket>>,
    next: AtomicU64,
    failed: Mutex<Option<String>>,
    /// Puts sent to the writer and not yet taken by it: how many, and their bytes.
    queued: AtomicUsize,
    queued_bytes: AtomicUsize,
}

type Bucket = HashMap<[u8; 32], (u64, Arc<[u8]>)>;

enum Message {
    Put {
        bucket: String,
        key: [u8; 32],
        value: Arc<[u8]>,
        seq: u64,
    },
    Flush(mpsc::SyncSender<()>),
}

impl DiskStore {
    /// Open (creating if needed) a cache folder, marked with `CACHEDIR.TAG` and a `.gitignore`.
    pub fn open(root: &Path) -> io::Result<DiskStore> {
        std::fs::create_dir_all(root)?;
        for (name, contents) in [("CACHEDIR.TAG", CACHEDIR_TAG), (".gitignore", "*\n")] {
            let path = root.join(name);
            if !path.exists() {
                std::fs::write(path, contents)?;
            }
        }
        let path = root.join(DATABASE);
        let mut conn = connect(&path, true)?;
        set_up(&mut conn).map_err(sql)?;
        import_layout_1(root, &mut conn)?;
        let pending = Arc::new(Pending::default());
        let (sender, receiver) = mpsc::channel();
        let writer = {
            let pending = pending.clone();
            std::thread::Builder::new()
                .name("keg-cache-writer".into())
                .spawn(move || write_loop(conn, &receiver, &pending))?
        };
        Ok(DiskStore {
            root: root.to_path_buf(),
            path,
            readers: Mutex::new(Vec::new()),
            pending,
            known: Mutex::new(HashMap::new()),
            sender: Some(sender),
            writer: Some(writer),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Entry count and bytes per bucket, sorted by bucket.
    pub fn stats(root: &Path) -> io::Result<Vec<(String, u64, u64)>> {
        if root.is_dir() && !layout_1_buckets(root)?.is_empty() {
            // Entries of layout 1 count once they are in the database.
            drop(DiskStore::open(root)?);
        }
        let Some(conn) = existing(root)? else {
            return Ok(Vec::new());
        };
        let mut statement = conn
            .prepare(
                "SELECT bucket, COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM entries \
                 GROUP BY bucket ORDER BY bucket",
            )
            .map_err(sql)?;
        let rows = statement
            .query_map([], |row| {
                let (entries, bytes): (i64, i64) = (row.get(1)?, row.get(2)?);
                Ok((row.get(0)?, entries as u64, bytes as u64))
            })
            .map_err(sql)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql)
    }

    /// Remove every entry, keeping the marker files.
    pub fn clear(root: &Path) -> io::Result<u64> {
        let mut removed = 0;
        if root.is_dir() {
            for bucket in layout_1_buckets(root)? {
                removed += walkdir::WalkDir::new(&bucket)
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_file())
                    .count() as u64;
                std::fs::remove_dir_all(bucket)?;
            }
        }
        if let Some(conn) = existing(root)? {
            removed += conn.execute("DELETE FROM entries", []).map_err(sql)? as u64;
            // Give the space back when no other process is reading; harmless when one is.
            let _ = conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);");
        }
        Ok(removed)
    }

    /// Whether the database may hold `key`: `false` only when it certainly does not.
    fn may_hold(&self, bucket: &str, key: &[u8; 32]) -> io::Result<bool> {
        let wanted = prefix(key);
        let mut known = lock(&self.known);
        if !known.contains_key(bucket) {
            let mut loaded = self.with_reader(|conn| Known::load(conn, bucket))?;
            // Puts not yet committed are not in the database's answer.
            if let Some(pending) = lock(&self.pending.entries).get(bucket) {
                pending.keys().for_each(|key| loaded.insert(prefix(key)));
            }
            known.insert(bucket.to_owned(), loaded);
        }
        let Some(bucket_known) = known.get_mut(bucket) else {
            return Ok(true);
        };
        if bucket_known.holds(wanted) {
            return Ok(true);
        }
        if bucket_known.caught_up.elapsed() < CATCH_UP {
            return Ok(false);
        }
        self.with_reader(|conn| bucket_known.catch_up(conn, bucket))?;
        Ok(bucket_known.holds(wanted))
    }

    /// Run `read` on an idle read connection.
    fn with_reader<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> io::Result<T> {
        let conn = self.reader()?;
        let result = read(&conn).map_err(sql);
        lock(&self.readers).push(conn);
        result
    }

    fn reader(&self) -> io::Result<Connection> {
        match lock(&self.readers).pop() {
            Some(conn) => Ok(conn),
            None => connect(&self.path, false),
        }
    }
}

impl Store for DiskStore {
    fn get(&self, bucket: &str, key: &blake3::Hash) -> io::Result<Option<Vec<u8>>> {
        if let Some((_, value)) = lock(&self.pending.entries)
            .get(bucket)
            .and_then(|entries| entries.get(key.as_bytes()))
        {
            return Ok(Some(value.to_vec()));
        }
        if !self.may_hold(bucket, key.as_bytes())? {
            return Ok(None);
        }
        self.with_reader(|conn| {
            conn.prepare_cached(SELECT)?
                .query_row(params![bucket, &key.as_bytes()[..]], |row| row.get(0))
                .optional()
        })
    }

    fn put(&self, bucket: &str, key: &blake3::Hash, value: &[u8]) -> io::Result<()> {
        self.pending.check()?;
        let value: Arc<[u8]> = Arc::from(value);
        let seq = self.pending.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending.entries)
            .entry(bucket.to_owned())
            .or_default()
            .insert(*key.as_bytes(), (seq, value.clone()));
        // Known before it is committed: once committed it leaves `pending`.
        if let Some(known) = lock(&self.known).get_mut(bucket) {
            known.insert(prefix(key.as_bytes()));
        }
        self.pending.queued.fetch_add(1, Ordering::Relaxed);
        self.pending
            .queued_bytes
            .fetch_add(value.len(), Ordering::Relaxed);
        let message = Message::Put {
            bucket: bucket.to_owned(),
            key: *key.as_bytes(),
            value,
            seq,
        };
        self.sender
            .as_ref()
            .and_then(|sender| sender.send(message).ok())
            .ok_or_else(|| io::Error::other("the cache writer has stopped"))
    }

    fn flush(&self) -> io::Result<()> {
        let (done, wait) = mpsc::sync_channel(1);
        if let Some(sender) = &self.sender
            && sender.send(Message::Flush(done)).is_ok()
        {
            // An error here means the writer is gone; `check` then says why.
            let _ = wait.recv();
        }
        self.pending.check()
    }
}

impl Drop for DiskStore {
    /// Write what is pending before the process goes on to exit.
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Known {
    /// Every key of `bucket`, read in one transaction with the highest row at that moment.
    fn load(conn: &Connection, bucket: &str) -> rusqlite::Result<Known> {
        let tx = conn.unchecked_transaction()?;
        let through = tx.query_row("SELECT COALESCE(MAX(rowid), 0) FROM entries", [], |row| {
            row.get(0)
        })?;
        let mut known = Known {
            prefixes: Some(HashSet::new()),
            through,
            caught_up: Instant::now(),
        };
        {
            // The (bucket, key) index alone answers this; no value is read.
            let mut statement = tx.prepare("SELECT key FROM entries WHERE bucket = ?1")?;
            let mut rows = statement.query(params![bucket])?;
            while known.prefixes.is_some()
                && let Some(row) = rows.next()?
            {
                known.insert(prefix(row.get_ref(0)?.as_blob()?));
            }
        }
        tx.commit()?;
        Ok(known)
    }

    /// Read in the keys of `bucket` written since (by this process or another).
    fn catch_up(&mut self, conn: &Connection, bucket: &str) -> rusqlite::Result<()> {
        // `+bucket`: walk the rows after `through`, not the bucket's whole index.
        let mut statement = conn
            .prepare_cached("SELECT rowid, key FROM entries WHERE rowid > ?1 AND +bucket = ?2")?;
        let mut rows = statement.query(params![self.through, bucket])?;
        while let Some(row) = rows.next()? {
            self.through = self.through.max(row.get(0)?);
            self.insert(prefix(row.get_ref(1)?.as_blob()?));
        }
        self.caught_up = Instant::now();
        Ok(())
    }

    fn holds(&self, prefix: u64) -> bool {
        self.prefixes
            .as_ref()
            .is_none_or(|set| set.contains(&prefix))
    }

    fn insert(&mut self, prefix: u64) {
        if let Some(set) = self.prefixes.as_mut() {
            if set.len() == MAX_KNOWN {
                self.prefixes = None;
            } else {
                set.insert(prefix);
            }
        }
    }
}

/// The first 8 bytes of a key (blake3 output: evenly spread), or of what a foreign row holds.
fn prefix(key: &[u8]) -> u64 {
    let mut first = [0; 8];
    let n = key.len().min(8);
    first[..n].copy_from_slice(&key[..n]);
    u64::from_le_bytes(first)
}

impl Pending {
    fn check(&self) -> io::Result<()> {
        match &*lock(&self.failed) {
            Some(err) => Err(io::Error::other(err.clone())),
            None => Ok(()),
        }
    }
}

/// Commit what has arrived, one transaction per batch, until every sender is gone.
fn write_loop(mut conn: Connection, receiver: &mpsc::Receiver<Message>, pending: &Pending) {
    let mut batch = Vec::with_capacity(BATCH);
    let take = |batch: &mut Vec<Message>, message: Message| {
        if let Message::Put { value, .. } = &message {
            pending.queued.fetch_sub(1, Ordering::Relaxed);
            pending
                .queued_bytes
                .fetch_sub(value.len(), Ordering::Relaxed);
        }
        batch.push(message);
    };
    while let Ok(first) = receiver.recv() {
        let flush = matches!(first, Message::Flush(_));
        take(&mut batch, first);
        if !flush {
            // Sleep rather than wait on the channel: a waiting receiver costs every `put` a
            // wake-up (a futex call and a context switch); a sleeping one costs nothing.
            let start = Instant::now();
            while start.elapsed() < GATHER
                && pending.queued.load(Ordering::Relaxed) < BATCH
                && pending.queued_bytes.load(Ordering::Relaxed) < GATHER_BYTES
            {
                std::thread::sleep(GATHER_STEP);
            }
        }
        while batch.len() < BATCH && !matches!(batch.last(), Some(Message::Flush(_))) {
            match receiver.try_recv() {
                Ok(message) => take(&mut batch, message),
                Err(_) => break,
            }
        }
        if let Err(err) = write_batch(&mut conn, &batch) {
            lock(&pending.failed).get_or_insert_with(|| err.to_string());
        }
        let mut entries = lock(&pending.entries);
        for message in batch.drain(..) {
            match message {
                Message::Put {
                    bucket, key, seq, ..
                } => {
                    // A later `put` of the same key stays pending until its own batch.
                    if let Some(bucket) = entries.get_mut(&bucket)
                        && bucket.get(&key).is_some_and(|(s, _)| *s == seq)
                    {
                        bucket.remove(&key);
                    }
                }
                Message::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Message]) -> rusqlite::Result<()> {
    if !batch.iter().any(|m| matches!(m, Message::Put { .. })) {
        return Ok(());
    }
    // IMMEDIATE takes the write lock up front, so two processes queue for it (busy timeout)
    // instead of failing on a read-to-write upgrade.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare_cached(UPSERT)?;
        for message in batch {
            if let Message::Put {
                bucket, key, value, ..
            } = message
            {
                upsert.execute(params![bucket, &key[..], &value[..]])?;
            }
        }
    }
    tx.commit()
}

/// Make a new database ready, or check an existing one is. Several processes may open a
/// new cache folder at once: switching the file to WAL needs it alone, and where two
/// connections would deadlock SQLite answers "busy" at once instead of waiting. Both are
/// harmless to try again, so this waits and tries again, up to [`BUSY_TIMEOUT`].
fn set_up(conn: &mut Connection) -> rusqlite::Result<()> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match try_set_up(conn) {
            Err(err) if is_busy(&err) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            done => return done,
        }
    }
}

fn try_set_up(conn: &mut Connection) -> rusqlite::Result<()> {
    // Entries (replies, a document's records) are a few KB: larger pages keep most of them
    // out of overflow chains. Takes effect only while the file is empty.
    conn.execute_batch("PRAGMA page_size = 16384;")?;
    // WAL: readers never block the writer nor each other, across processes too; it stays
    // set in the file. `synchronous = NORMAL` (see [`connect`]) keeps every commit safe
    // from a killed process (a power cut may lose the last ones, never corrupt the file).
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    }
    // IMMEDIATE: the table check and its creation happen under one write lock.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(CREATE)?;
    tx.commit()
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn connect(path: &Path, create: bool) -> io::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL;")
        .map_err(sql)?;
    Ok(conn)
}

/// The database of a cache folder if there is one, for `keg cache`; never creates it.
fn existing(root: &Path) -> io::Result<Option<Connection>> {
    let path = root.join(DATABASE);
    if !path.is_file() {
        return Ok(None);
    }
    let conn = connect(&path, false)?;
    let tables: u32 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'entries'",
            [],
            |row| row.get(0),
        )
        .map_err(sql)?;
    Ok((tables > 0).then_some(conn))
}

/// The bucket folders of layout 1: every folder in the cache root.
fn layout_1_buckets(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut buckets = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            buckets.push(entry.path());
        }
    }
    buckets.sort();
    Ok(buckets)
}

/// Move the entries of layout 1 into the database, one transaction per bucket, then delete
/// the bucket's files. Another process may be doing the same at the same moment: both
/// insert the same bytes, and a file the other one removed first is skipped.
fn import_layout_1(root: &Path, conn: &mut Connection) -> io::Result<()> {
    for bucket in layout_1_buckets(root)? {
        let Some(name) = bucket
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        {
            let mut upsert = tx.prepare_cached(UPSERT).map_err(sql)?;
            for entry in walkdir::WalkDir::new(&bucket).into_iter().flatten() {
                let file_name = entry.file_name().to_string_lossy();
                let Ok(key) = blake3::Hash::from_hex(file_name.as_bytes()) else {
                    continue; // a temp file of an interrupted write, or something foreign
                };
                if !entry.file_type().is_file() {
                    continue;
                }
                let value = match std::fs::read(entry.path()) {
                    Ok(value) => value,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                };
                upsert
                    .execute(params![name, &key.as_bytes()[..], value])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        match std::fs::remove_dir_all(&bucket) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

fn sql(err: rusqlite::Error) -> io::Error {
    io::Error::other(err)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_another_process_writes_are_found_and_missing_keys_are_answered_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let here = DiskStore::open(dir.path()).unwrap();
        let there = DiskStore::open(dir.path()).unwrap();
        let (old, new, never) = (
            blake3::hash(b"old"),
            blake3::hash(b"new"),
            blake3::hash(b"-"),
        );
        there.put("calls-v1", &old, b"1").unwrap();
        there.flush().unwrap();
        // The first lookup reads the bucket's keys in.
        assert_eq!(
            here.get("calls-v1", &old).unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(here.get("calls-v1", &never).unwrap(), None);
        assert!(!here.may_hold("calls-v1", never.as_bytes()).unwrap());
        // Written by the other process after that: found once the reader catches up.
        there.put("calls-v1", &new, b"2").unwrap();
        there.flush().unwrap();
        std::thread::sleep(CATCH_UP * 2);
        assert_eq!(
            here.get("calls-v1", &new).unwrap().as_deref(),
            Some(&b"2"[..])
        );
        // This process's own puts are known at once, committed or not.
        here.put("calls-v1", &never, b"3").unwrap();
        assert!(here.may_hold("calls-v1", never.as_bytes()).unwrap());
        here.flush().unwrap();
        assert_eq!(
            here.get("calls-v1", &never).unwrap().as_deref(),
            Some(&b"3"[..])
        );
        // Another bucket is read in on its own.
        assert_eq!(here.get("records-v1", &old).unwrap(), None);
    }

    #[test]
    fn put_then_get_and_markers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        let store = DiskStore::open(&root).unwrap();
        let key = blake3::hash(b"k");
        assert_eq!(store.get("calls-v1", &key).unwrap(), None);
        store.put("calls-v1", &key, b"value").unwrap();
        // Seen at once, before the writer has committed it.
        assert_eq!(
            store.get("calls-v1", &key).unwrap().as_deref(),
            Some(&b"value"[..])
        );
        store.flush().unwrap();
        assert_eq!(
            store.get("calls-v1", &key).unwrap().as_deref(),
            Some(&b"value"[..])
        );
        assert!(root.join("CACHEDIR.TAG").is_file());
        assert!(root.join(DATABASE).is_file());
        assert_eq!(
            std::fs::read_to_string(root.join(".gitignore")).unwrap(),
            "*\n"
        );
        let stats = DiskStore::stats(&root).unwrap();
        assert_eq!(stats, vec![("calls-v1".to_owned(), 1, 5)]);
        assert_eq!(DiskStore::clear(&root).unwrap(), 1);
        assert_eq!(store.get("calls-v1", &key).unwrap(), None);
        assert_eq!(DiskStore::stats(&root).unwrap(), vec![]);
    }

    #[test]
    fn dropping_the_store_writes_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        for i in 0u32..2000 {
            store
                .put("b", &blake3::hash(&i.to_le_bytes()), &i.to_le_bytes())
                .unwrap();
        }
        drop(store);
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("b".to_owned(), 2000, 8000)]
        );
        let store = DiskStore::open(dir.path()).unwrap();
        let key = blake3::hash(&1999u32.to_le_bytes());
        assert_eq!(
            store.get("b", &key).unwrap().as_deref(),
            Some(&1999u32.to_le_bytes()[..])
        );
    }

    #[test]
    fn many_stores_opening_a_new_folder_at_once_all_open() {
        // Creating the file, switching it to WAL and creating the table each take a lock;
        // a second opener must wait for them, never fail with "database is locked".
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("cache");
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|scope| {
                for i in 0u8..8 {
                    let (root, barrier) = (&root, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        let store = DiskStore::open(root).unwrap();
                        store.put("b", &blake3::hash(&[i]), &[i]).unwrap();
                        store.flush().unwrap();
                    });
                }
            });
            assert_eq!(
                DiskStore::stats(&root).unwrap(),
                vec![("b".to_owned(), 8, 8)]
            );
        }
    }

    #[test]
    fn two_stores_on_one_folder_write_at_once_and_read_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            DiskStore::open(dir.path()).unwrap(),
            DiskStore::open(dir.path()).unwrap(),
        );
        std::thread::scope(|scope| {
            for (store, tag) in [(&a, 0u8), (&b, 1u8)] {
                scope.spawn(move || {
                    for i in 0u32..500 {
                        let key = blake3::hash(&[&i.to_le_bytes()[..], &[tag]].concat());
                        store.put("b", &key, &[tag; 100]).unwrap();
                    }
                    store.flush().unwrap();
                });
            }
        });
        let key = blake3::hash(&[&7u32.to_le_bytes()[..], &[1]].concat());
        assert_eq!(a.get("b", &key).unwrap(), Some(vec![1; 100]));
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("b".to_owned(), 1000, 100_000)]
        );
    }

    #[test]
    fn layout_1_entries_are_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = blake3::hash(b"old");
        let hex = key.to_hex();
        let folder = dir.path().join("calls-v1").join(&hex[..2]);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(hex.as_str()), b"old reply").unwrap();
        std::fs::write(folder.join(".tmpXYZ"), b"torn").unwrap();
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("calls-v1".to_owned(), 1, 9)]
        );
        let store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get("calls-v1", &key).unwrap().as_deref(),
            Some(&b"old reply"[..])
        );
        assert!(!dir.path().join("calls-v1").exists());
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("calls-v1".to_owned(), 1, 9)]
        );
    }
}
