//! The on-disk store: one SQLite database per cache folder, in WAL mode, written in batches
//! by a thread of its own, so that no call waits for the disk and several `keg` processes
//! can share one cache at once (SQLite locks the file for them; readers never wait).
//!
//! Writes only append. Keys are random (blake3), and a B-tree on random keys touches a page
//! of its own for nearly every new entry: each commit rewrote those pages whole, to the WAL
//! and again to the file, and the cost per entry grew with the cache. Instead, entries get
//! increasing ids, every table is ordered by id (within a bucket), and each process keeps
//! the keys of the buckets it reads in memory ([`Known`]), mapped to their ids.

// Keys and bucket names are looked up several times per call; foldhash hashes them in a
// fraction of the standard library's SipHash.
use foldhash::{HashMap, HashMapExt};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::Store;
use crate::lock;

/// The database in a cache folder. The name carries the layout's version: layout 1 was one
/// file per entry, `<bucket>/<2 hex>/<64 hex>`; layout 2 was one table keyed by (bucket,
/// key); layout 3 is this database. A later layout gets a new name rather than a file older
/// builds would misread; older layouts found on open are imported once (see
/// `import_layout_1`, `import_layout_2`), so no cached call is lost.
pub const DATABASE: &str = "cache-v3.sqlite";
const DATABASE_2: &str = "cache-v2.sqlite";

/// How long a write waits for another process's transaction before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most messages taken into one transaction.
const BATCH: usize = 1024;
/// How long the writer gathers entries before it commits them (a flush commits at once):
/// a commit costs a WAL frame per page it touched (16 KB), and the last page of each table
/// is shared by the entries gathered. A killed process loses at most this much. At 64 calls
/// in flight (about 1,300 replies a second) 25 ms gathered ~32 entries a commit, and the
/// writer took 13% of the run's CPU; 250 ms gathers ~320 and takes 7.5% (BENCHMARKS.md).
/// Faster runs fill a [`BATCH`] sooner.
const GATHER: Duration = Duration::from_millis(250);
/// The writer stops gathering once [`GATHER_BYTES`] or [`BATCH`] entries wait (the `put`
/// that gets there wakes it): large entries (a document's records) gain nothing from
/// waiting, and would only be held in memory longer.
const GATHER_BYTES: usize = 4 << 20;
/// The writer's page cache: 1 MiB, half SQLite's default. It appends at the end of each
/// table, so the pages it reads again are the few at the right edge of each B-tree, plus a
/// batch's new pages until it commits. With the default, the cache grew page by page
/// through every run to 2 MB and more, each page memory the process touched for the
/// first time (BENCHMARKS.md, change 52); smaller still, a batch at 512 calls in flight
/// would no longer fit and SQLite would write pages to the WAL twice.
const WRITER_CACHE: &str = "PRAGMA cache_size = -1024;";

const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag created by keg.\n# For information about cache directory tags see https://bford.info/cachedir/\n";

/// `blobs` holds the entries in the order they were written (AUTOINCREMENT: an id is never
/// used twice, so "rows after id N" means "written since"). `keys` lists each bucket's keys
/// in the same order, narrow enough that reading a bucket's keys in is cheap; it is clustered
/// by (bucket, id), so a new key is appended at the end of its bucket.
const CREATE: &str = "CREATE TABLE IF NOT EXISTS blobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    bucket TEXT NOT NULL,
    id INTEGER NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (bucket, id)
) WITHOUT ROWID;";
/// The starts of the statements that append entries, several rows at a time (see
/// [`append`]). `OR FAIL`: a row that fails ends the statement without undoing the rows
/// before it, so SQLite keeps no statement journal to undo them (copies of the pages they
/// touch); the batch's whole transaction is rolled back instead.
const INSERT_BLOB: &str = "INSERT OR FAIL INTO blobs (key, value) VALUES";
const INSERT_KEY: &str = "INSERT OR FAIL INTO keys (bucket, id, key) VALUES";
const SELECT: &str = "SELECT key, value FROM blobs WHERE id = ?1";
/// A key written again replaces its row; the key is compared, so a row whose key only
/// shares the first 8 bytes is kept.
const DELETE_BLOB: &str = "DELETE FROM blobs WHERE id = ?1 AND key = ?2";
const DELETE_KEY: &str = "DELETE FROM keys WHERE bucket = ?1 AND id = ?2 AND key = ?3";
/// How often the keys other processes wrote are read in: a key another process wrote less
/// than this long ago may be missed once (its call is sent again, and both replies are valid).
const CATCH_UP: Duration = Duration::from_millis(50);
/// The id [`Known`] gives a key this process has put and the writer not yet committed.
const PENDING: i64 = 0;

/// Entries in one SQLite database (`<root>/cache-v3.sqlite`), keyed by bucket and blake3
/// key. `put` hands the entry to the writer thread and returns; each batch is one
/// transaction, so a killed process leaves whole entries or none, and loses at most the
/// batch being gathered (calls finished in the last `GATHER`, 250 ms).
pub struct DiskStore {
    root: PathBuf,
    path: PathBuf,
    /// Idle read connections: one per thread reading at the same moment.
    readers: Mutex<Vec<Connection>>,
    shared: Arc<Shared>,
    sender: Option<mpsc::Sender<Message>>,
    writer: Option<JoinHandle<()>>,
}

/// The keys one bucket holds, by their first 8 bytes, with the id of their row: a lookup of
/// a key the cache does not hold (every call of a new document) is answered here without
/// reading the database, and one it holds reads a single row by id. The row's key has the
/// last word. About 30 bytes per key (60 MB for 2 million cached calls).
struct Known {
    ids: HashMap<u64, i64>,
    /// The highest id of this bucket read in; rows above it were written since.
    through: i64,
    caught_up: Instant,
}

/// What the store's callers and its writer share.
#[derive(Default)]
struct Shared {
    /// Entries handed to the writer and not yet committed, so that `get` sees them at once:
    /// bucket → key → (the `put`'s sequence number, the value).
    pending: Mutex<HashMap<String, Bucket>>,
    /// Bucket → its keys, for buckets read or written so far. The writer gives each key it
    /// commits its id here before the entry leaves `pending`.
    known: Mutex<HashMap<String, Known>>,
    /// The first write error, reported by the next `put` or `flush`.
    failed: Mutex<Option<String>>,
    next: AtomicU64,
    /// Puts sent to the writer and not yet taken by it: how many, and their bytes.
    queued: AtomicUsize,
    queued_bytes: AtomicUsize,
    /// Callers waiting for what they put to be committed (a `flush`, or the store being
    /// dropped): the writer stops gathering while any waits.
    waiting: AtomicUsize,
    /// The writer thread, for the `put` that fills a batch, a `flush` and `drop` to wake it.
    writer: OnceLock<std::thread::Thread>,
    /// The ids this process's writer committed, as sorted ranges (after first, up to last]:
    /// a batch's rows are consecutive, as it holds the write lock. Catching up steps over
    /// them: every key in them is known from its `put` already.
    own: Mutex<Vec<(i64, i64)>>,
}

type Bucket = HashMap<[u8; 32], (u64, Arc<[u8]>)>;

enum Message {
    Put(Put),
    Flush(mpsc::SyncSender<()>),
}

struct Put {
    bucket: String,
    key: [u8; 32],
    value: Arc<[u8]>,
    seq: u64,
    /// The row this entry replaces, when the key was known to be cached.
    replaces: Option<i64>,
}

impl Message {
    fn put(&self) -> Option<&Put> {
        match self {
            Message::Put(put) => Some(put),
            Message::Flush(_) => None,
        }
    }
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
        // Room for every statement the writer uses (`append` keeps up to 14).
        conn.set_prepared_statement_cache_capacity(32);
        conn.execute_batch(WRITER_CACHE).map_err(sql)?;
        import_layout_2(root, &mut conn)?;
        import_layout_1(root, &mut conn)?;
        let shared = Arc::new(Shared::default());
        let (sender, receiver) = mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("keg-cache-writer".into())
                .spawn(move || write_loop(conn, &receiver, &shared))?
        };
        let _ = shared.writer.set(writer.thread().clone());
        lock(&OPEN).push((shared.clone(), sender.clone()));
        Ok(DiskStore {
            root: root.to_path_buf(),
            path,
            readers: Mutex::new(Vec::new()),
            shared,
            sender: Some(sender),
            writer: Some(writer),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Entry count and bytes per bucket, sorted by bucket.
    pub fn stats(root: &Path) -> io::Result<Vec<(String, u64, u64)>> {
        if has_older_layout(root)? {
            // Entries of older layouts count once they are in the database.
            drop(DiskStore::open(root)?);
        }
        let Some(conn) = existing(root)? else {
            return Ok(Vec::new());
        };
        let mut statement = conn
            .prepare(
                "SELECT k.bucket, COUNT(*), COALESCE(SUM(LENGTH(b.value)), 0) \
                 FROM keys AS k JOIN blobs AS b ON b.id = k.id \
                 GROUP BY k.bucket ORDER BY k.bucket",
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
            for path in layout_2_files(root) {
                if path.is_file() {
                    std::fs::remove_file(path)?;
                }
            }
        }
        if let Some(mut conn) = existing(root)? {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            removed += tx.execute("DELETE FROM keys", []).map_err(sql)? as u64;
            tx.execute("DELETE FROM blobs", []).map_err(sql)?;
            tx.commit().map_err(sql)?;
            // Give the space back when no other process is reading; harmless when one is.
            let _ = conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);");
        }
        Ok(removed)
    }

    /// The id of the row that may hold `key` (`None`: the database certainly does not), from
    /// the keys in memory; `fresh` reads in what other processes wrote since, however recent
    /// the last look.
    fn row_of(&self, bucket: &str, key: &[u8; 32], fresh: bool) -> io::Result<Option<i64>> {
        let wanted = prefix(key);
        let mut known = lock(&self.shared.known);
        let bucket_known = self.known_bucket(&mut known, bucket)?;
        let id = bucket_known.ids.get(&wanted).copied();
        if id.is_some_and(|id| id != PENDING) && !fresh {
            return Ok(id);
        }
        if !fresh && bucket_known.caught_up.elapsed() < CATCH_UP {
            return Ok(None);
        }
        // Held through the reads: a range listed now was committed before they began, so
        // every row below it is in what they read.
        let mut own = lock(&self.shared.own);
        self.with_reader(|conn| bucket_known.catch_up(conn, bucket, &own))?;
        let id = bucket_known.ids.get(&wanted).copied();
        // Ranges every bucket read in has caught up past are stepped over by none.
        if let Some(lowest) = known.values().map(|k| k.through).min() {
            own.retain(|(_, last)| *last > lowest);
        }
        Ok(id.filter(|id| *id != PENDING))
    }

    /// The keys of `bucket`, read in on first use.
    fn known_bucket<'k>(
        &self,
        known: &'k mut HashMap<String, Known>,
        bucket: &str,
    ) -> io::Result<&'k mut Known> {
        if !known.contains_key(bucket) {
            let mut loaded = self.with_reader(|conn| Known::load(conn, bucket))?;
            // Puts not yet committed are not in the database's answer. The writer gives
            // them their ids under the lock held here, before they leave `pending`.
            if let Some(pending) = lock(&self.shared.pending).get(bucket) {
                for key in pending.keys() {
                    loaded.ids.insert(prefix(key), PENDING);
                }
            }
            known.insert(bucket.to_owned(), loaded);
        }
        Ok(known
            .get_mut(bucket)
            .expect("the bucket's keys were just read in"))
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

    /// The value in row `id` if it holds `key`.
    fn read_row(&self, id: i64, key: &[u8; 32]) -> io::Result<Option<Vec<u8>>> {
        self.with_reader(|conn| {
            conn.prepare_cached(SELECT)?
                .query_row(params![id], |row| {
                    let found = row.get_ref(0)?.as_blob()? == key;
                    found.then(|| row.get(1)).transpose()
                })
                .optional()
                .map(Option::flatten)
        })
    }
}

impl Store for DiskStore {
    fn get(&self, bucket: &str, key: &blake3::Hash) -> io::Result<Option<Vec<u8>>> {
        let key = key.as_bytes();
        if let Some((_, value)) = lock(&self.shared.pending)
            .get(bucket)
            .and_then(|entries| entries.get(key))
        {
            return Ok(Some(value.to_vec()));
        }
        let Some(id) = self.row_of(bucket, key, false)? else {
            return Ok(None);
        };
        if let Some(value) = self.read_row(id, key)? {
            return Ok(Some(value));
        }
        // Another process wrote the key again since (and removed the row read in), or the
        // row holds another key with the same first 8 bytes.
        match self.row_of(bucket, key, true)? {
            Some(again) if again != id => self.read_row(again, key),
            _ => Ok(None),
        }
    }

    fn holds(&self, bucket: &str) -> io::Result<bool> {
        if lock(&self.shared.pending)
            .get(bucket)
            .is_some_and(|entries| !entries.is_empty())
        {
            return Ok(true);
        }
        let mut known = lock(&self.shared.known);
        Ok(!self.known_bucket(&mut known, bucket)?.ids.is_empty())
    }

    fn put(&self, bucket: &str, key: &blake3::Hash, value: &[u8]) -> io::Result<()> {
        self.shared.check()?;
        let key = *key.as_bytes();
        let value: Arc<[u8]> = Arc::from(value);
        let seq = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let replaces = {
            let mut known = lock(&self.shared.known);
            let bucket_known = self.known_bucket(&mut known, bucket)?;
            // Known before it is committed: the writer gives it its id.
            bucket_known
                .ids
                .insert(prefix(&key), PENDING)
                .filter(|id| *id != PENDING)
        };
        {
            let mut pending = lock(&self.shared.pending);
            // The map copies a bucket's name for its first entry only (the message below
            // carries a copy of its own).
            let entries = match pending.get_mut(bucket) {
                Some(entries) => entries,
                None => pending.entry(bucket.to_owned()).or_default(),
            };
            entries.insert(key, (seq, value.clone()));
        }
        let queued = self.shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = self
            .shared
            .queued_bytes
            .fetch_add(value.len(), Ordering::Relaxed);
        // Only the `put` that fills the batch wakes the gathering writer, once its entry is
        // on the channel, so that the batch the writer takes holds it. (The counts go up
        // before the send: the writer takes them down as it receives.)
        let fills =
            queued == BATCH || (bytes < GATHER_BYTES && bytes + value.len() >= GATHER_BYTES);
        let message = Message::Put(Put {
            bucket: bucket.to_owned(),
            key,
            value,
            seq,
            replaces,
        });
        let sent = self
            .sender
            .as_ref()
            .and_then(|sender| sender.send(message).ok())
            .ok_or_else(|| io::Error::other("the cache writer has stopped"));
        if fills {
            self.shared.wake_writer();
        }
        sent
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(sender) = &self.sender {
            commit_through(&self.shared, sender, None);
        }
        self.shared.check()
    }
}

/// Have the writer commit everything sent to it before this, and wait until it has (for at
/// most `patience`, when given). Returns at once when the writer is gone; the store's
/// `check` then says why.
fn commit_through(shared: &Shared, sender: &mpsc::Sender<Message>, patience: Option<Duration>) {
    let (done, wait) = mpsc::sync_channel(1);
    // Counted before it is sent: the writer takes the count down as it receives it.
    shared.waiting.fetch_add(1, Ordering::Relaxed);
    if sender.send(Message::Flush(done)).is_err() {
        shared.waiting.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    shared.wake_writer();
    let _ = match patience {
        Some(patience) => wait.recv_timeout(patience).ok(),
        None => wait.recv().ok(),
    };
}

/// Every open store's writer, for [`commit_before_abort`]. A store adds its own when it
/// opens and takes it out before letting its writer go.
static OPEN: Mutex<Vec<(Arc<Shared>, mpsc::Sender<Message>)>> = Mutex::new(Vec::new());

/// How long [`commit_before_abort`] waits for each writer.
const ABORT_PATIENCE: Duration = Duration::from_secs(10);

/// Commit what every open store has been given, for a process about to abort on a panic:
/// release builds do not unwind (`Cargo.toml`), so no store is dropped, and the calls that
/// finished would otherwise be sent again by the next run. Waits for each writer for up to
/// [`ABORT_PATIENCE`]. Skips the writer the panic happened on, and does nothing when the
/// list of stores is held (a panic while a store opens or closes).
pub fn commit_before_abort() {
    let Ok(open) = OPEN.try_lock() else {
        return;
    };
    let here = std::thread::current().id();
    for (shared, sender) in open.iter() {
        if shared
            .writer
            .get()
            .is_some_and(|writer| writer.id() == here)
        {
            continue;
        }
        commit_through(shared, sender, Some(ABORT_PATIENCE));
    }
}

impl Drop for DiskStore {
    /// Write what is pending before the process goes on to exit.
    fn drop(&mut self) {
        // The readers close first, so that the writer's connection is the last: the last to
        // close checkpoints the WAL, and a reader's handle would sync the folder once more.
        drop(std::mem::take(&mut *lock(&self.readers)));
        // Never taken down: from here on the writer commits what it has without gathering.
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        // The writer stops once no sender is left, the list's included.
        lock(&OPEN).retain(|(shared, _)| !Arc::ptr_eq(shared, &self.shared));
        drop(self.sender.take());
        self.shared.wake_writer();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Known {
    /// Every key of `bucket`, in the order written: a key written twice maps to its last row.
    fn load(conn: &Connection, bucket: &str) -> rusqlite::Result<Known> {
        let mut known = Known {
            ids: HashMap::new(),
            through: 0,
            caught_up: Instant::now(),
        };
        let mut statement = conn.prepare("SELECT id, key FROM keys WHERE bucket = ?1")?;
        let mut rows = statement.query(params![bucket])?;
        while let Some(row) = rows.next()? {
            known.insert(row.get(0)?, row.get_ref(1)?.as_blob()?);
        }
        Ok(known)
    }

    /// Read in the keys of `bucket` that other processes wrote since; the rows in `own`
    /// (this process's) are stepped over.
    fn catch_up(
        &mut self,
        conn: &Connection,
        bucket: &str,
        own: &[(i64, i64)],
    ) -> rusqlite::Result<()> {
        let mut statement = conn.prepare_cached(
            "SELECT id, key FROM keys WHERE bucket = ?1 AND id > ?2 AND id <= ?3",
        )?;
        // Transactions commit one at a time, in the order of their ids: what one read sees
        // is every row up to some id, and rows below an own range were committed before it.
        let mut read_up_to = |known: &mut Known, until: i64| -> rusqlite::Result<()> {
            if until > known.through {
                let mut rows = statement.query(params![bucket, known.through, until])?;
                while let Some(row) = rows.next()? {
                    known.insert(row.get(0)?, row.get_ref(1)?.as_blob()?);
                }
            }
            Ok(())
        };
        for &(first, last) in own {
            if last > self.through {
                read_up_to(self, first)?;
                self.through = self.through.max(last);
            }
        }
        read_up_to(self, i64::MAX)?;
        self.caught_up = Instant::now();
        Ok(())
    }

    fn insert(&mut self, id: i64, key: &[u8]) {
        self.ids.insert(prefix(key), id);
        self.through = self.through.max(id);
    }
}

/// The first 8 bytes of a key (blake3 output: evenly spread), or of what a foreign row holds.
fn prefix(key: &[u8]) -> u64 {
    let mut first = [0; 8];
    let n = key.len().min(8);
    first[..n].copy_from_slice(&key[..n]);
    u64::from_le_bytes(first)
}

impl Shared {
    /// Cut the writer's gathering short (see [`write_loop`]).
    fn wake_writer(&self) {
        if let Some(writer) = self.writer.get() {
            writer.unpark();
        }
    }

    fn check(&self) -> io::Result<()> {
        match &*lock(&self.failed) {
            Some(err) => Err(io::Error::other(err.clone())),
            None => Ok(()),
        }
    }
}

/// Commit what has arrived, one transaction per batch, until every sender is gone.
fn write_loop(mut conn: Connection, receiver: &mpsc::Receiver<Message>, shared: &Shared) {
    let mut batch = Vec::with_capacity(BATCH);
    let take = |batch: &mut Vec<Message>, message: Message| {
        match &message {
            Message::Put(put) => {
                shared.queued.fetch_sub(1, Ordering::Relaxed);
                shared
                    .queued_bytes
                    .fetch_sub(put.value.len(), Ordering::Relaxed);
            }
            Message::Flush(_) => {
                shared.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
        batch.push(message);
    };
    while let Ok(first) = receiver.recv() {
        let flush = matches!(first, Message::Flush(_));
        take(&mut batch, first);
        if !flush {
            // Park rather than wait on the channel: a waiting receiver costs every `put` a
            // wake-up (a futex call and a context switch); a parked one is woken once, by
            // the `put` that fills the batch, a `flush` or `drop`, or when the time is up.
            let start = Instant::now();
            while let Some(left) = GATHER.checked_sub(start.elapsed())
                && shared.queued.load(Ordering::Relaxed) < BATCH
                && shared.queued_bytes.load(Ordering::Relaxed) < GATHER_BYTES
                && shared.waiting.load(Ordering::Relaxed) == 0
            {
                std::thread::park_timeout(left);
            }
        }
        while batch.len() < BATCH && !matches!(batch.last(), Some(Message::Flush(_))) {
            match receiver.try_recv() {
                Ok(message) => take(&mut batch, message),
                Err(_) => break,
            }
        }
        let puts: Vec<&Put> = batch.iter().filter_map(Message::put).collect();
        let ids = match write_batch(&mut conn, &puts, shared) {
            Ok(ids) => ids,
            Err(err) => {
                lock(&shared.failed).get_or_insert_with(|| err.to_string());
                Vec::new()
            }
        };
        let written = || ids.iter().flatten().copied();
        if let (Some(first), Some(last)) = (written().next(), written().last()) {
            let mut own = lock(&shared.own);
            // Under the write lock, the batch's ids follow the highest id before it.
            let after = first - 1;
            match own.last_mut() {
                Some((_, end)) if *end == after => *end = last,
                _ => own.push((after, last)),
            }
        }
        // Each committed key gets its id before it leaves `pending` (see `known_bucket`).
        {
            let mut known = lock(&shared.known);
            for (put, id) in puts.iter().zip(&ids) {
                // Not `Known::insert`: rows of other processes may lie below these ids,
                // not yet read in, so `through` stays where catching up left it.
                if let (Some(bucket), Some(id)) = (known.get_mut(put.bucket.as_str()), id) {
                    bucket.ids.insert(prefix(&put.key), *id);
                }
            }
        }
        {
            let mut entries = lock(&shared.pending);
            for put in &puts {
                // A later `put` of the same key stays pending until its own batch.
                if let Some(bucket) = entries.get_mut(&put.bucket)
                    && bucket.get(&put.key).is_some_and(|(s, _)| *s == put.seq)
                {
                    bucket.remove(&put.key);
                }
            }
        }
        drop(puts);
        for message in batch.drain(..) {
            if let Message::Flush(done) = message {
                let _ = done.send(());
            }
        }
    }
}

/// Commit one batch; the id of each entry, in order (`None`: a later `put` of the same key
/// supersedes it, and it is not written). A key cached already, by this process or another,
/// has its old row removed: the cache holds one row per key.
fn write_batch(
    conn: &mut Connection,
    puts: &[&Put],
    shared: &Shared,
) -> rusqlite::Result<Vec<Option<i64>>> {
    if puts.is_empty() {
        return Ok(Vec::new());
    }
    // IMMEDIATE takes the write lock up front, so two processes queue for it (busy timeout)
    // instead of failing on a read-to-write upgrade.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Under the write lock every other process's rows are committed: the keys they wrote to
    // these buckets are read in, so a key another run cached meanwhile is replaced.
    let old: Vec<[Option<i64>; 2]> = {
        let mut known = lock(&shared.known);
        let own = lock(&shared.own);
        let mut buckets: Vec<&str> = puts.iter().map(|put| put.bucket.as_str()).collect();
        buckets.sort_unstable();
        buckets.dedup();
        for bucket in buckets {
            if let Some(bucket_known) = known.get_mut(bucket) {
                bucket_known.catch_up(&tx, bucket, &own)?;
            }
        }
        puts.iter()
            .map(|put| {
                let now = known
                    .get(put.bucket.as_str())
                    .and_then(|k| k.ids.get(&prefix(&put.key)).copied())
                    .filter(|id| *id != PENDING && Some(*id) != put.replaces);
                [put.replaces, now]
            })
            .collect()
    };
    // A put that a later one of the same key supersedes is not written.
    let latest: Vec<bool> = {
        let pending = lock(&shared.pending);
        puts.iter()
            .map(|put| {
                pending
                    .get(&put.bucket)
                    .and_then(|entries| entries.get(&put.key))
                    .is_none_or(|(seq, _)| *seq == put.seq)
            })
            .collect()
    };
    let written: Vec<Entry> = puts
        .iter()
        .zip(&latest)
        .filter(|(_, latest)| **latest)
        .map(|(put, _)| (put.bucket.as_str(), &put.key[..], &put.value[..]))
        .collect();
    let mut new_ids = append(&tx, &written)?.into_iter();
    let mut ids = Vec::with_capacity(puts.len());
    for ((put, old), latest) in puts.iter().zip(&old).zip(latest) {
        if !latest {
            ids.push(None);
            continue;
        }
        ids.push(new_ids.next());
        // Rows written before this batch: their ids are below every new one.
        for old in old.iter().flatten() {
            tx.prepare_cached(DELETE_BLOB)?
                .execute(params![old, &put.key[..]])?;
            tx.prepare_cached(DELETE_KEY)?
                .execute(params![put.bucket, old, &put.key[..]])?;
        }
    }
    tx.commit()?;
    Ok(ids)
}

/// The most entries one pair of statements appends.
const MOST_ROWS: usize = 64;

/// An entry to append: its bucket, key and value.
type Entry<'a> = (&'a str, &'a [u8], &'a [u8]);

/// Append the entries, in order; their ids. A statement of several rows costs SQLite its
/// set-up once (the cursors, the schema check, `sqlite_sequence`'s update) rather than
/// once per row: entries go in groups of [`MOST_ROWS`], then of the powers of two the rest
/// adds up to, so that at most 2 × 7 statements are kept prepared.
fn append(conn: &Connection, entries: &[Entry]) -> rusqlite::Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(entries.len());
    let mut rest = entries;
    while !rest.is_empty() {
        let rows = if rest.len() >= MOST_ROWS {
            MOST_ROWS
        } else {
            1 << rest.len().ilog2()
        };
        let (group, after) = rest.split_at(rows);
        let mut blobs = conn.prepare_cached(&insert_rows(INSERT_BLOB, "(?, ?)", rows))?;
        for (n, (_, key, value)) in group.iter().enumerate() {
            blobs.raw_bind_parameter(2 * n + 1, key)?;
            blobs.raw_bind_parameter(2 * n + 2, value)?;
        }
        blobs.raw_execute()?;
        // Under the write lock, with AUTOINCREMENT, the rows of one statement take
        // consecutive ids, in the order given.
        let last = conn.last_insert_rowid();
        let first = last - rows as i64 + 1;
        let mut keys = conn.prepare_cached(&insert_rows(INSERT_KEY, "(?, ?, ?)", rows))?;
        for (n, ((bucket, key, _), id)) in group.iter().zip(first..).enumerate() {
            keys.raw_bind_parameter(3 * n + 1, bucket)?;
            keys.raw_bind_parameter(3 * n + 2, id)?;
            keys.raw_bind_parameter(3 * n + 3, key)?;
        }
        keys.raw_execute()?;
        ids.extend(first..=last);
        rest = after;
    }
    Ok(ids)
}

/// `insert` (ending in `VALUES`) with `rows` rows of `row`.
fn insert_rows(insert: &str, row: &str, rows: usize) -> String {
    let mut sql = String::with_capacity(insert.len() + rows * (row.len() + 1));
    sql.push_str(insert);
    for n in 0..rows {
        sql.push_str(if n == 0 { " " } else { "," });
        sql.push_str(row);
    }
    sql
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
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'blobs'",
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
/// insert the same bytes (the later row is the one read), and a file the other one removed
/// first is skipped.
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
            append(&tx, &[(&name, key.as_bytes(), &value)]).map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        match std::fs::remove_dir_all(&bucket) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

/// The files of layout 2: its database and the database's WAL and shared-memory files.
fn layout_2_files(root: &Path) -> [PathBuf; 3] {
    ["", "-wal", "-shm"].map(|end| root.join(format!("{DATABASE_2}{end}")))
}

/// Whether the folder still holds entries of an older layout, imported on open.
fn has_older_layout(root: &Path) -> io::Result<bool> {
    Ok(root.is_dir() && (root.join(DATABASE_2).is_file() || !layout_1_buckets(root)?.is_empty()))
}

/// Copy the entries of layout 2 (one table keyed by bucket and key) in, keeping their
/// order, then delete its files. Another process opening the folder at the same moment
/// waits for the write lock, and copies nothing twice: the ids are the old row ids.
fn import_layout_2(root: &Path, conn: &mut Connection) -> io::Result<()> {
    let old = root.join(DATABASE_2);
    if !old.is_file() {
        return Ok(());
    }
    let import = |conn: &mut Connection| -> rusqlite::Result<()> {
        conn.execute("ATTACH DATABASE ?1 AS old", params![old.to_string_lossy()])?;
        let copied = copy_layout_2(conn);
        conn.execute("DETACH DATABASE old", [])?;
        copied
    };
    import(conn).map_err(|err| {
        io::Error::other(format!(
            "cannot import the cache's older database {}: {err}; `keg cache clear` removes it",
            old.display()
        ))
    })?;
    for path in layout_2_files(root) {
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

/// Copy the entries of the attached layout 2 database `old`, if it has any, keeping their
/// row ids as ids.
fn copy_layout_2(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let tables: u32 = tx.query_row(
        "SELECT COUNT(*) FROM old.sqlite_master WHERE type = 'table' AND name = 'entries'",
        [],
        |row| row.get(0),
    )?;
    if tables > 0 {
        tx.execute_batch(
            "INSERT OR IGNORE INTO blobs (id, key, value)
                 SELECT rowid, key, value FROM old.entries ORDER BY rowid;
             INSERT OR IGNORE INTO keys (bucket, id, key)
                 SELECT bucket, rowid, key FROM old.entries;",
        )?;
    }
    tx.commit()
}

fn sql(err: rusqlite::Error) -> io::Error {
    io::Error::other(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Put and wait until it is committed.
    fn put_now(store: &DiskStore, bucket: &str, key: &blake3::Hash, value: &[u8]) {
        store.put(bucket, key, value).unwrap();
        store.flush().unwrap();
    }

    fn value(store: &DiskStore, bucket: &str, key: &blake3::Hash) -> Option<Vec<u8>> {
        store.get(bucket, key).unwrap()
    }

    /// Two stores on one new folder, as two processes would have.
    fn two_stores() -> (tempfile::TempDir, DiskStore, DiskStore) {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            DiskStore::open(dir.path()).unwrap(),
            DiskStore::open(dir.path()).unwrap(),
        );
        (dir, a, b)
    }

    #[test]
    fn keys_another_process_writes_are_found_and_missing_keys_are_answered_from_memory() {
        let (_dir, here, there) = two_stores();
        let (old, new, never) = (
            blake3::hash(b"old"),
            blake3::hash(b"new"),
            blake3::hash(b"-"),
        );
        put_now(&there, "calls-v1", &old, b"1");
        // The first lookup reads the bucket's keys in.
        assert_eq!(value(&here, "calls-v1", &old), Some(b"1".to_vec()));
        assert_eq!(here.get("calls-v1", &never).unwrap(), None);
        assert_eq!(
            here.row_of("calls-v1", never.as_bytes(), false).unwrap(),
            None
        );
        // Written by the other process after that: found once the reader catches up.
        put_now(&there, "calls-v1", &new, b"2");
        std::thread::sleep(CATCH_UP * 2);
        assert_eq!(value(&here, "calls-v1", &new), Some(b"2".to_vec()));
        // This process's own puts are found at once, committed or not.
        here.put("calls-v1", &never, b"3").unwrap();
        assert_eq!(value(&here, "calls-v1", &never), Some(b"3".to_vec()));
        here.flush().unwrap();
        assert_eq!(value(&here, "calls-v1", &never), Some(b"3".to_vec()));
        // Another bucket is read in on its own.
        assert_eq!(here.get("records-v1", &old).unwrap(), None);
    }

    #[test]
    fn catching_up_steps_over_the_rows_this_process_wrote_and_reads_the_rest() {
        let (dir, here, there) = two_stores();
        let keys: Vec<_> = (0u8..6).map(|i| blake3::hash(&[i])).collect();
        assert_eq!(here.get("calls-v1", &keys[5]).unwrap(), None);
        // Ids 1–2 here, 3 there, 4–5 here, 6 there.
        for (store, key) in [
            (&here, 0),
            (&here, 1),
            (&there, 2),
            (&here, 3),
            (&here, 4),
            (&there, 5),
        ] {
            put_now(store, "calls-v1", &keys[key], &[key as u8]);
        }
        assert_eq!(*lock(&here.shared.own), [(0, 2), (3, 5)]);
        std::thread::sleep(CATCH_UP * 2);
        for (id, key) in (1..).zip(&keys) {
            assert_eq!(
                here.row_of("calls-v1", key.as_bytes(), false).unwrap(),
                Some(id)
            );
        }
        assert_eq!(
            here.get("calls-v1", &keys[5]).unwrap().as_deref(),
            Some(&[5u8][..])
        );
        // The ranges it stepped over are dropped once every bucket read is past them.
        assert_eq!(*lock(&here.shared.own), []);

        // The rows in the ranges are not read: a key there would not be found.
        let conn = connect(&dir.path().join(DATABASE), false).unwrap();
        let mut known = Known::load(&conn, "calls-v1").unwrap();
        known.ids.clear();
        known.through = 0;
        known
            .catch_up(&conn, "calls-v1", &[(0, 2), (3, 5)])
            .unwrap();
        let found: Vec<bool> = keys
            .iter()
            .map(|k| known.ids.contains_key(&prefix(k.as_bytes())))
            .collect();
        assert_eq!(found, [false, false, true, false, false, true]);
        assert_eq!(known.through, 6);
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
        assert_eq!(value(&store, "calls-v1", &key), Some(b"value".to_vec()));
        store.flush().unwrap();
        assert_eq!(value(&store, "calls-v1", &key), Some(b"value".to_vec()));
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
    fn a_panic_about_to_abort_has_what_was_put_committed_and_a_closed_store_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        store.put("b", &blake3::hash(b"1"), b"1").unwrap();
        // The writer gathers for 250 ms; the entry is in the file once this returns.
        commit_before_abort();
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("b".to_owned(), 1, 1)]
        );
        let shared = Arc::downgrade(&store.shared);
        drop(store);
        // Nothing kept the store's writer: it stopped, and the list holds no sender for it.
        assert_eq!(shared.strong_count(), 0);
        commit_before_abort();
    }

    /// A `flush`, or dropping the store at the end of a run, commits at once rather than
    /// after the writer's gathering time (a run's last step waits on one of them).
    #[test]
    fn flush_and_drop_cut_the_gathering_short() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        store.put("b", &blake3::hash(b"1"), b"1").unwrap();
        let start = Instant::now();
        store.flush().unwrap();
        let flushed = start.elapsed();
        store.put("b", &blake3::hash(b"2"), b"2").unwrap();
        let start = Instant::now();
        drop(store);
        let dropped = start.elapsed();
        assert!(flushed < GATHER / 2, "flush took {flushed:?}");
        assert!(dropped < GATHER / 2, "drop took {dropped:?}");
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("b".to_owned(), 2, 2)]
        );
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
                        put_now(&store, "b", &blake3::hash(&[i]), &[i]);
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
        let (dir, a, b) = two_stores();
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
        // `a` read the bucket's keys in at its first put; `b`'s are read in once
        // [`CATCH_UP`] has passed since.
        std::thread::sleep(CATCH_UP * 2);
        let key = blake3::hash(&[&7u32.to_le_bytes()[..], &[1]].concat());
        assert_eq!(a.get("b", &key).unwrap(), Some(vec![1; 100]));
        let key = blake3::hash(&[&7u32.to_le_bytes()[..], &[0]].concat());
        assert_eq!(b.get("b", &key).unwrap(), Some(vec![0; 100]));
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("b".to_owned(), 1000, 100_000)]
        );
    }

    #[test]
    fn a_key_written_again_replaces_its_row_here_and_in_another_process() {
        let (dir, here, there) = two_stores();
        let key = blake3::hash(b"k");
        put_now(&here, "outputs-v1", &key, b"first");
        std::thread::sleep(CATCH_UP * 2);
        assert_eq!(value(&there, "outputs-v1", &key), Some(b"first".to_vec()));
        put_now(&here, "outputs-v1", &key, b"second");
        // `there` knows the first row, which is gone: it reads the new one in at once.
        assert_eq!(value(&there, "outputs-v1", &key), Some(b"second".to_vec()));
        put_now(&there, "outputs-v1", &key, b"third");
        drop((here, there));
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("outputs-v1".to_owned(), 1, 5)]
        );
        let store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(value(&store, "outputs-v1", &key), Some(b"third".to_vec()));
    }

    /// One batch of 100 entries goes in as statements of 64, 32 and 4 rows: each entry gets
    /// the next id in the order it was put, in whichever bucket, and its key row that id.
    #[test]
    fn a_batch_of_many_entries_takes_ids_in_the_order_put() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let old = blake3::hash(b"old");
        put_now(&store, "calls-v1", &old, b"old");
        assert_eq!(
            store.row_of("calls-v1", old.as_bytes(), false).unwrap(),
            Some(1)
        );
        // Every tenth to another bucket; entry 55 replaces `old`; the last puts entry 7's
        // key again, so entry 7 is not written.
        let entries: Vec<(&str, blake3::Hash, Vec<u8>)> = (0u8..100)
            .map(|i| {
                let bucket = if i % 10 == 0 {
                    "records-v1"
                } else {
                    "calls-v1"
                };
                match i {
                    55 => (bucket, old, b"new".to_vec()),
                    99 => (bucket, blake3::hash(&[7]), b"again".to_vec()),
                    _ => (bucket, blake3::hash(&[i]), vec![i; usize::from(i) + 1]),
                }
            })
            .collect();
        for (bucket, key, value) in &entries {
            store.put(bucket, key, value).unwrap();
        }
        store.flush().unwrap();
        let written: Vec<_> = entries
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 7)
            .collect();
        for ((_, (bucket, key, _)), id) in written.iter().zip(2..) {
            assert_eq!(
                store.row_of(bucket, key.as_bytes(), false).unwrap(),
                Some(id)
            );
        }
        drop(store);
        let store = DiskStore::open(dir.path()).unwrap();
        for (_, (bucket, key, value)) in &written {
            assert_eq!(store.get(bucket, key).unwrap().as_ref(), Some(value));
        }
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![
                ("calls-v1".to_owned(), 89, 4_434),
                ("records-v1".to_owned(), 10, 460)
            ]
        );
        let conn = connect(&dir.path().join(DATABASE), false).unwrap();
        let matched: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM blobs JOIN keys ON blobs.id = keys.id AND blobs.key = keys.key",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(matched, 99);
    }

    #[test]
    fn a_key_put_by_two_stores_or_twice_in_one_batch_is_kept_once() {
        let (dir, a, b) = two_stores();
        let (k, twice) = (blake3::hash(b"k"), blake3::hash(b"twice"));
        // Both read the bucket's keys in before either writes: `b` puts without having
        // seen `a`'s row, and its writer finds it under the write lock.
        assert_eq!(value(&a, "calls-v1", &k), None);
        assert_eq!(value(&b, "calls-v1", &k), None);
        put_now(&a, "calls-v1", &k, b"a");
        put_now(&b, "calls-v1", &k, b"b");
        a.put("calls-v1", &twice, b"1").unwrap();
        put_now(&a, "calls-v1", &twice, b"2");
        assert_eq!(a.get("calls-v1", &twice).unwrap(), Some(b"2".to_vec()));
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("calls-v1".to_owned(), 2, 2)]
        );
        drop((a, b));
        let store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(store.get("calls-v1", &k).unwrap(), Some(b"b".to_vec()));
    }

    #[test]
    fn layout_2_entries_are_imported_once_in_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<_> = (0u8..3).map(|i| blake3::hash(&[i])).collect();
        {
            let old = Connection::open(dir.path().join(DATABASE_2)).unwrap();
            old.execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE entries (bucket TEXT NOT NULL, \
                 key BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (bucket, key))",
            )
            .unwrap();
            for (i, key) in keys.iter().enumerate() {
                old.execute(
                    "INSERT INTO entries (bucket, key, value) VALUES (?1, ?2, ?3)",
                    params![
                        if i == 2 { "documents-v1" } else { "calls-v1" },
                        &key.as_bytes()[..],
                        vec![b'v'; i + 1]
                    ],
                )
                .unwrap();
            }
        }
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![
                ("calls-v1".to_owned(), 2, 3),
                ("documents-v1".to_owned(), 1, 3)
            ]
        );
        for path in layout_2_files(dir.path()) {
            assert!(!path.exists(), "{} is left", path.display());
        }
        let store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get("calls-v1", &keys[1]).unwrap(),
            Some(b"vv".to_vec())
        );
        assert_eq!(
            store.get("documents-v1", &keys[2]).unwrap(),
            Some(b"vvv".to_vec())
        );
        assert_eq!(store.get("documents-v1", &keys[0]).unwrap(), None);
        // New entries follow the imported ones.
        let new = blake3::hash(b"new");
        put_now(&store, "calls-v1", &new, b"n");
        assert_eq!(
            store.row_of("calls-v1", new.as_bytes(), false).unwrap(),
            Some(4)
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
        assert_eq!(value(&store, "calls-v1", &key), Some(b"old reply".to_vec()));
        assert!(!dir.path().join("calls-v1").exists());
        assert_eq!(
            DiskStore::stats(dir.path()).unwrap(),
            vec![("calls-v1".to_owned(), 1, 9)]
        );
    }
}
