//! The durable spool: an append-only log of segment files between the write
//! requests (which wait for their append to be on disk) and the ClickHouse
//! writer (which reads from it and releases what ClickHouse acknowledged).
//!
//! # Why our own log and not a crate
//!
//! The well-kept Rust WALs (okaywal, and the sled/commitlog family) are built
//! around a *checkpoint* model: the log owns the decision of when entries are
//! checkpointed and hands them to a callback, after which they are gone. The
//! tee needs the opposite: entries are released only after an *external*
//! system (ClickHouse) acknowledged them, possibly hours later, while appends
//! go on and a bounded size refuses new entries. Expressing that on okaywal
//! means fighting its checkpointer (holding checkpoints open indefinitely) and
//! re-reading entries through its recovery API. What we need is small: framed
//! records with checksums, one writer thread doing group commit, a reader
//! cursor and an acknowledged position. That is this file.
//!
//! # Format
//!
//! The directory holds segment files `NNNNNNNNNNNNNNNNNNNN.seg` (sequence
//! number, zero-padded) and `ack` (the acknowledged position). A segment is a
//! sequence of records:
//!
//! ```text
//! len: u32 LE | crc32: u32 LE | appended_ms: i64 LE | payload: len bytes
//! ```
//!
//! `crc32` (crc32fast, IEEE) covers `appended_ms` and the payload. Recovery
//! scans every unacknowledged segment and truncates it at the first record
//! that is short or fails its checksum: a torn write at the tail (a crash
//! during `write`) loses only records whose append was never acknowledged to a
//! client, because a client is answered only after `fdatasync` returned.
//! After recovery the writer always starts a fresh segment.
//!
//! # Group commit
//!
//! [`Spool::append`] sends its framed record to one writer thread and awaits
//! the answer. The thread takes everything queued, writes it with one
//! `write_all`, calls `fdatasync` once, and then wakes every waiter of that
//! batch: concurrent requests share one fsync, and a request arriving during
//! an fsync rides on the next one.
//!
//! # Release
//!
//! [`SpoolReader`] reads records up to the durable end; after ClickHouse
//! acknowledged them the writer calls [`SpoolReader::ack`], which records the
//! position in `ack` (write to a temporary file and rename; not fsynced,
//! because losing it only means re-sending rows ClickHouse deduplicates) and
//! deletes segments that are entirely acknowledged.
//!
//! # Bound
//!
//! The size bound counts bytes appended but not yet acknowledged. An append
//! that would exceed it fails with [`SpoolError::Full`] (503: the sender
//! retries later). Disk use can exceed the bound by at most one segment,
//! because segments are deleted whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::clock::unix_now_ms;
use crate::config::SpoolConfig;
use crate::health::{panic_message, Down, Reporter};

/// Bytes of a record header.
pub const HEADER_LEN: u64 = 16;
/// Largest accepted record payload (a corrupt length beyond it ends recovery).
pub const MAX_RECORD: u64 = 256 << 20;
/// Most bytes one group commit writes before syncing.
const MAX_GROUP_BYTES: usize = 32 << 20;
const SEGMENT_SUFFIX: &str = ".seg";
const ACK_FILE: &str = "ack";

/// A position in the log: segment sequence number and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub seg: u64,
    pub off: u64,
}

/// What the spool needs to know.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    /// Most unacknowledged bytes.
    pub max_bytes: u64,
    /// Segment size at which a new segment is started.
    pub segment_bytes: u64,
    /// How long a group stays open for more appends after its first.
    pub commit_delay: Duration,
    /// Least time between the starts of two group commits (under load a
    /// group then stays open longer than `commit_delay`).
    pub commit_interval: Duration,
    /// Where the spool reports that it is poisoned or its committer died.
    pub health: Option<Reporter>,
}

impl SpoolOptions {
    /// The options the `[spool]` settings give.
    pub fn from_config(cfg: &SpoolConfig) -> SpoolOptions {
        SpoolOptions {
            dir: cfg.dir.clone(),
            max_bytes: cfg.max_bytes.bytes(),
            segment_bytes: cfg.segment_bytes.bytes(),
            commit_delay: cfg.commit_delay,
            commit_interval: cfg.commit_interval,
            health: None,
        }
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Wall-clock time of the append, in ms since the epoch.
    pub appended_ms: i64,
    pub payload: Vec<u8>,
    /// Position just after this record (what to [`SpoolReader::ack`]).
    pub end: Pos,
}

/// State shared by the appenders, the writer thread and the reader.
struct Shared {
    dir: PathBuf,
    /// Bytes appended (or being appended) and not yet acknowledged.
    used: AtomicU64,
    max_bytes: u64,
    /// End of the durable data (after the last fsync).
    durable: Mutex<Pos>,
    /// Woken after every group commit.
    committed: Notify,
    /// Group commits done (for tests and metrics).
    syncs: AtomicU64,
    /// Set when the writer thread failed and could not restore a clean
    /// tail, or died: appends are refused from then on.
    poisoned: AtomicBool,
    health: Option<Reporter>,
}

impl Shared {
    /// Refuses every later append and reports why.
    fn poison(&self, down: Down) {
        self.poisoned.store(true, Ordering::Release);
        if let Some(h) = &self.health {
            h.down(down);
        }
    }
}

struct Job {
    frame: Vec<u8>,
    /// Gets the result and the frame back (for the caller to reuse).
    done: oneshot::Sender<(io::Result<()>, Vec<u8>)>,
}

/// The append side. Cheap to share behind an `Arc`.
pub struct Spool {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The read-and-release side (one, owned by the ClickHouse writer).
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// Next record to read.
    cursor: Pos,
    /// Acknowledged up to here.
    acked: Pos,
    /// Open file of `cursor.seg`.
    file: Option<(u64, File)>,
    /// Appended-at time of the oldest unacknowledged record read so far.
    oldest_unacked_ms: Option<i64>,
    /// Payload buffers given back by [`SpoolReader::recycle`].
    spare: Vec<Vec<u8>>,
}

/// Writes every buffer, in order, with as few `writev` calls as the kernel
/// allows: a group commit copies no frame into one buffer first.
/// `Write::write_all_vectored` is not stable.
fn write_all_vectored(out: &mut impl Write, bufs: &[Vec<u8>]) -> io::Result<()> {
    const MAX_IOV: usize = 1024; // IOV_MAX on Linux
    let (mut i, mut off) = (0, 0); // next byte: bufs[i][off]
    while i < bufs.len() {
        if off == bufs[i].len() {
            (i, off) = (i + 1, 0);
            continue;
        }
        let iov: Vec<io::IoSlice<'_>> = std::iter::once(&bufs[i][off..])
            .chain(bufs[i + 1..].iter().map(Vec::as_slice))
            .take(MAX_IOV)
            .map(io::IoSlice::new)
            .collect();
        let mut n = match out.write_vectored(&iov) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 {
            let left = bufs[i].len() - off;
            if n < left {
                off += n;
                n = 0;
            } else {
                n -= left;
                (i, off) = (i + 1, 0);
            }
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"))
}

/// Why an append did not become durable (the request then fails with 503).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full")]
    Full,
    #[error("record larger than the spool takes")]
    TooLarge,
    #[error("spool is closed")]
    Closed,
    #[error("the spool failed and takes nothing until rwgate restarts (see /-/ready)")]
    Poisoned,
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
}

/// A record on its way into the spool: its payload after [`HEADER_LEN`]
/// bytes kept free for the header, which [`Spool::append_frame`] fills in,
/// so that appending copies nothing. Whoever writes the payload builds the
/// frame; the buffer comes back from the append for reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    buf: Vec<u8>,
}

impl Default for Frame {
    fn default() -> Frame {
        Frame::with_buffer(Vec::new())
    }
}

impl Frame {
    /// A frame writing into `buf` (cleared first): a buffer reused from an
    /// earlier record is already large enough.
    pub fn with_buffer(mut buf: Vec<u8>) -> Frame {
        buf.clear();
        buf.resize(HEADER_LEN as usize, 0);
        Frame { buf }
    }

    /// A frame holding a copy of `payload`.
    pub fn from_payload(payload: &[u8]) -> Frame {
        let mut f = Frame::with_buffer(Vec::with_capacity(HEADER_LEN as usize + payload.len()));
        f.extend_from_slice(payload);
        f
    }

    pub fn payload(&self) -> &[u8] {
        &self.buf[HEADER_LEN as usize..]
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buf[HEADER_LEN as usize..]
    }

    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.buf.len() - HEADER_LEN as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Cuts the payload to `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(HEADER_LEN as usize + len);
    }

    /// Makes room for `additional` more payload bytes.
    pub fn reserve(&mut self, additional: usize) {
        self.buf.reserve(additional);
    }

    /// Payload bytes that fit without growing.
    pub fn capacity(&self) -> usize {
        self.buf.capacity().saturating_sub(HEADER_LEN as usize)
    }

    /// The underlying buffer (for reuse).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// The frame as it goes to disk, sealed at `appended_ms`.
    fn seal(&mut self, appended_ms: i64) {
        seal(&mut self.buf, appended_ms);
    }
}

/// Frames one record, as the spool writes it.
pub fn frame(appended_ms: i64, payload: &[u8]) -> Vec<u8> {
    let mut f = Frame::from_payload(payload);
    f.seal(appended_ms);
    f.into_buffer()
}

/// Fills in the header of a frame whose payload follows `HEADER_LEN`
/// reserved bytes.
fn seal(frame: &mut [u8], appended_ms: i64) {
    let (header, payload) = frame.split_at_mut(HEADER_LEN as usize);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&appended_ms.to_le_bytes());
    crc.update(payload);
    header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    header[8..16].copy_from_slice(&appended_ms.to_le_bytes());
}

/// Reads one record at the reader's position; `Ok(None)` at a clean end, a
/// short record, or a bad checksum (all three end the valid prefix). The
/// payload goes into `payload` (cleared first; a reused buffer is neither
/// zeroed nor faulted in again).
fn read_record(r: &mut impl Read, payload: &mut Vec<u8>) -> io::Result<Option<i64>> {
    let mut h = [0u8; HEADER_LEN as usize];
    payload.clear();
    if !read_full(r, &mut h)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as u64;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let ms_bytes = [h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]];
    if len > MAX_RECORD {
        return Ok(None);
    }
    payload.reserve(len as usize);
    // Into spare capacity, not zeroed first; retries interrupted reads.
    r.by_ref().take(len).read_to_end(payload)?;
    if payload.len() as u64 != len {
        return Ok(None);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&ms_bytes);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Ok(None);
    }
    Ok(Some(i64::from_le_bytes(ms_bytes)))
}

/// Fills `buf`; false if the input ended first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => return Ok(false),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Length of the valid prefix of a segment file.
fn valid_len(path: &Path) -> io::Result<u64> {
    let mut r = io::BufReader::new(File::open(path)?);
    let mut len = 0;
    let mut payload = Vec::new();
    while read_record(&mut r, &mut payload)?.is_some() {
        len += HEADER_LEN + payload.len() as u64;
    }
    Ok(len)
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name.strip_suffix(SEGMENT_SUFFIX) {
            if let Ok(seq) = num.parse::<u64>() {
                seqs.push(seq);
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

fn read_ack(dir: &Path) -> Option<Pos> {
    let bytes = fs::read(dir.join(ACK_FILE)).ok()?;
    if bytes.len() != 20 {
        return None;
    }
    let seg = u64::from_le_bytes(bytes[0..8].try_into().ok()?);
    let off = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    (crc32fast::hash(&bytes[..16]) == crc).then_some(Pos { seg, off })
}

fn write_ack(dir: &Path, pos: Pos) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend_from_slice(&pos.seg.to_le_bytes());
    bytes.extend_from_slice(&pos.off.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    let tmp = dir.join("ack.tmp");
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, dir.join(ACK_FILE))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (or creates) the spool in `opts.dir`: recovers every segment
    /// (truncating torn tails), starts a fresh segment and the writer thread.
    pub fn open(opts: &SpoolOptions) -> io::Result<(Spool, SpoolReader)> {
        Spool::open_with_clock(opts, Box::new(WallClock))
    }

    /// [`open`](Self::open) with the committer's clock given (tests move
    /// their own).
    fn open_with_clock(
        opts: &SpoolOptions,
        clock: Box<dyn CommitClock>,
    ) -> io::Result<(Spool, SpoolReader)> {
        fs::create_dir_all(&opts.dir)?;
        let dir = opts.dir.clone();
        let seqs = list_segments(&dir)?;
        let mut acked = read_ack(&dir).unwrap_or_default();
        // Segments wholly before the acknowledged one are garbage.
        for &seq in seqs.iter().filter(|&&s| s < acked.seg) {
            fs::remove_file(segment_path(&dir, seq))?;
        }
        let live: Vec<u64> = seqs.into_iter().filter(|&s| s >= acked.seg).collect();
        if live.first() != Some(&acked.seg) {
            // The acknowledged segment is gone (or there is no ack): start
            // at the first remaining segment.
            acked = Pos {
                seg: live.first().copied().unwrap_or(acked.seg.max(1)),
                off: 0,
            };
        }
        let mut used = 0;
        for &seq in &live {
            let path = segment_path(&dir, seq);
            let valid = valid_len(&path)?;
            let actual = fs::metadata(&path)?.len();
            if valid < actual {
                tracing::warn!(
                    segment = %path.display(),
                    valid,
                    actual,
                    "spool: truncating a torn or corrupt tail"
                );
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid)?;
                f.sync_all()?;
            }
            if seq == acked.seg {
                acked.off = acked.off.min(valid);
                used += valid - acked.off;
            } else {
                used += valid;
            }
        }
        let active = live.last().map_or(acked.seg, |s| s + 1);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&dir, active))?;
        sync_dir(&dir)?;

        let shared = Arc::new(Shared {
            dir: dir.clone(),
            used: AtomicU64::new(used),
            max_bytes: opts.max_bytes,
            durable: Mutex::new(Pos {
                seg: active,
                off: 0,
            }),
            committed: Notify::new(),
            syncs: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            health: opts.health.clone(),
        });
        let (tx, rx) = mpsc::channel();
        let committer = Committer {
            shared: shared.clone(),
            file,
            seg: active,
            off: 0,
            segment_bytes: opts.segment_bytes,
            commit_delay: opts.commit_delay,
            commit_interval: opts.commit_interval,
            clock,
        };
        // The committer returns only once the spool is closed; a panic
        // poisons the spool (the appends then in flight fail as closed).
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rwgate-spool".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| committer.run(rx));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    watched.poison(Down::Panicked(panic_message(&*panic)));
                }
            })?;
        let reader = SpoolReader {
            shared: shared.clone(),
            cursor: acked,
            acked,
            file: None,
            oldest_unacked_ms: None,
            spare: Vec::new(),
        };
        Ok((
            Spool {
                shared,
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
            },
            reader,
        ))
    }

    /// Appends one record and returns once it is on disk (shared fsync).
    pub async fn append(&self, payload: &[u8]) -> Result<(), SpoolError> {
        self.append_frame(Frame::from_payload(payload))
            .await
            .map(drop)
    }

    /// Appends a frame (its header is written in place: no copy of the
    /// payload) and returns it, once it is on disk, for reuse.
    pub async fn append_frame(&self, frame: Frame) -> Result<Frame, SpoolError> {
        self.reserve(frame)?.write().await
    }

    /// Takes the room `frame` needs, or says at once why the spool cannot
    /// take it (full, poisoned, too large): the request path asks before
    /// forwarding, so that a sender retrying into a full spool is not
    /// forwarded again and again. The room is given back if the
    /// [`Reserved`] is dropped unwritten.
    pub fn reserve(&self, frame: Frame) -> Result<Reserved<'_>, SpoolError> {
        let size = frame.buf.len() as u64;
        if size - HEADER_LEN > MAX_RECORD {
            return Err(SpoolError::TooLarge);
        }
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(SpoolError::Poisoned);
        }
        // Reserve the space first so that concurrent appends cannot overshoot.
        let before = self.shared.used.fetch_add(size, Ordering::AcqRel);
        if before + size > self.shared.max_bytes {
            self.shared.used.fetch_sub(size, Ordering::AcqRel);
            return Err(SpoolError::Full);
        }
        Ok(Reserved {
            spool: self,
            frame: Some(frame),
            size,
        })
    }

    /// Bytes appended and not yet acknowledged by ClickHouse.
    pub fn pending_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Acquire)
    }

    /// Completes after the next group commit (or at once if one happened
    /// since the last call).
    pub async fn committed(&self) {
        self.shared.committed.notified().await
    }

    /// Group commits done since open.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Stops the writer thread after it committed everything queued. Appends
    /// after this fail.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("spool writer thread panicked");
            }
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.close();
    }
}

/// The committer's time. It is an OS thread (it blocks in `fsync`), out of
/// reach of tokio's paused clock, so tests hand it a clock they move.
trait CommitClock: Send {
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration);
}

/// The real clock.
struct WallClock;

impl CommitClock for WallClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Room taken in the spool for one frame ([`Spool::reserve`]), not yet
/// written.
pub struct Reserved<'a> {
    spool: &'a Spool,
    frame: Option<Frame>,
    /// Bytes counted in `used` that this owns; 0 once the committer does.
    size: u64,
}

impl Reserved<'_> {
    /// Writes the frame and returns it, once it is on disk, for reuse.
    pub async fn write(mut self) -> Result<Frame, SpoolError> {
        let mut frame = self.frame.take().unwrap_or_default();
        frame.seal(unix_now_ms());
        let frame = frame.into_buffer();
        let (done, wait) = oneshot::channel();
        let sent = match self.spool.tx.lock() {
            Ok(tx) => tx
                .as_ref()
                .map(|tx| tx.send(Job { frame, done }).is_ok())
                .unwrap_or(false),
            Err(_) => false,
        };
        if !sent {
            return Err(SpoolError::Closed);
        }
        // From here on the committer owns the reservation: it gives it back
        // when the group commit fails, also when this future was dropped
        // meanwhile (the sender hung up, the deadline passed), which left
        // the bytes counted for good.
        self.size = 0;
        match wait.await {
            Ok((Ok(()), buf)) => Ok(Frame { buf }),
            Ok((Err(e), _)) => Err(SpoolError::Io(e)),
            Err(_) => Err(SpoolError::Closed),
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.size > 0 {
            self.spool
                .shared
                .used
                .fetch_sub(self.size, Ordering::AcqRel);
        }
    }
}

/// The committer thread: owns the active segment and does the group commits.
struct Committer {
    shared: Arc<Shared>,
    file: File,
    seg: u64,
    off: u64,
    segment_bytes: u64,
    commit_delay: Duration,
    commit_interval: Duration,
    clock: Box<dyn CommitClock>,
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut frames = Vec::new();
        let mut waiters = Vec::new();
        let mut last_start: Option<Instant> = None;
        // Blocks for the first job of a group, then takes whatever queued.
        while let Ok(first) = rx.recv() {
            let mut bytes = first.frame.len();
            frames.push(first.frame);
            waiters.push(first.done);
            // Let the group fill, asleep (a receiver waiting in `recv` is
            // woken by every send, a context switch per append): for the
            // commit delay, and under load until the commit interval since
            // the last group's start has passed, so that the fsyncs per
            // second stay bounded and each carries more requests. Then
            // take whatever queued.
            let now = self.clock.now();
            let mut until = now + self.commit_delay;
            if let Some(last) = last_start {
                until = until.max(last + self.commit_interval);
            }
            if until > now {
                self.clock.sleep(until - now);
            }
            last_start = Some(self.clock.now());
            while bytes < MAX_GROUP_BYTES {
                let Ok(job) = rx.try_recv() else { break };
                bytes += job.frame.len();
                frames.push(job.frame);
                waiters.push(job.done);
            }
            let result = self.commit(&frames, bytes);
            if let Err(e) = &result {
                tracing::error!(error = %e, "spool: group commit failed");
            }
            // Hand each frame back to its appender: the buffer is reused
            // for a later record, and freed (if at all) on the thread that
            // made it.
            for (w, f) in waiters.drain(..).zip(frames.drain(..)) {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        self.shared.used.fetch_sub(f.len() as u64, Ordering::AcqRel);
                        Err(io::Error::new(e.kind(), e.to_string()))
                    }
                };
                let _ = w.send((r, f));
            }
        }
    }

    /// Writes a group of frames (`bytes` in all) and fsyncs.
    fn commit(&mut self, frames: &[Vec<u8>], bytes: usize) -> io::Result<()> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(io::Error::other("spool writer failed earlier"));
        }
        if self.off > 0 && self.off + bytes as u64 > self.segment_bytes {
            self.rotate()?;
        }
        let written =
            write_all_vectored(&mut self.file, frames).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Cut the partial write off so that the log stays a clean
            // sequence of records; if even that fails, stop appending.
            let restored = self
                .file
                .set_len(self.off)
                .and_then(|()| self.file.seek(SeekFrom::Start(self.off)).map(|_| ()));
            if let Err(r) = restored {
                self.shared.poison(Down::SpoolPoisoned {
                    write: e.to_string(),
                    truncate: r.to_string(),
                });
            }
            return Err(e);
        }
        self.off += bytes as u64;
        if let Ok(mut d) = self.shared.durable.lock() {
            *d = Pos {
                seg: self.seg,
                off: self.off,
            };
        }
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::SPOOL_SYNCS).increment(1);
        self.shared.committed.notify_one();
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let next = self.seg + 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.shared.dir, next))?;
        sync_dir(&self.shared.dir)?;
        self.file = file;
        self.seg = next;
        self.off = 0;
        if let Ok(mut d) = self.shared.durable.lock() {
            *d = Pos { seg: next, off: 0 };
        }
        Ok(())
    }
}

impl SpoolReader {
    /// Where reading resumes (tests).
    pub fn cursor(&self) -> Pos {
        self.cursor
    }

    /// Appended-at time of the oldest record read and not yet acknowledged.
    pub fn oldest_unacked_ms(&self) -> Option<i64> {
        self.oldest_unacked_ms
    }

    /// Bytes appended and not yet acknowledged.
    pub fn pending_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Acquire)
    }

    /// Whether durable data lies beyond the cursor.
    pub fn has_unread(&self) -> bool {
        self.durable() > self.cursor
    }

    fn durable(&self) -> Pos {
        self.shared
            .durable
            .lock()
            .map(|d| *d)
            .unwrap_or(self.cursor)
    }

    /// Waits until a group commit happened (or returns at once if durable
    /// data is already waiting). Cancel-safe.
    pub async fn wait_for_data(&self) {
        let notified = self.shared.committed.notified();
        if self.has_unread() {
            return;
        }
        notified.await;
    }

    /// Reads durable records from the cursor on, stopping after `max_bytes`
    /// of payload or `max_records` records, and advances the cursor. Blocking
    /// file I/O (page-cache reads): call from a blocking context.
    pub fn read(&mut self, max_records: usize, max_bytes: usize) -> io::Result<Vec<Record>> {
        let durable = self.durable();
        let mut out = Vec::new();
        let mut bytes = 0;
        while self.cursor < durable && out.len() < max_records && bytes < max_bytes {
            let seg = self.cursor.seg;
            if self.file.as_ref().map(|(s, _)| *s) != Some(seg) {
                match File::open(segment_path(&self.shared.dir, seg)) {
                    Ok(mut f) => {
                        f.seek(SeekFrom::Start(self.cursor.off))?;
                        self.file = Some((seg, f));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound && seg < durable.seg => {
                        self.cursor = Pos {
                            seg: seg + 1,
                            off: 0,
                        };
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((_, file)) = self.file.as_mut() else {
                continue;
            };
            // The active segment is read only up to its durable end.
            if seg == durable.seg && self.cursor.off >= durable.off {
                break;
            }
            let mut payload = self.spare.pop().unwrap_or_default();
            match read_record(file, &mut payload)? {
                Some(ms) => {
                    self.cursor.off += HEADER_LEN + payload.len() as u64;
                    bytes += payload.len();
                    self.oldest_unacked_ms.get_or_insert(ms);
                    out.push(Record {
                        appended_ms: ms,
                        payload,
                        end: self.cursor,
                    });
                }
                None if seg < durable.seg => {
                    // End of a sealed segment: on to the next.
                    self.spare.push(payload);
                    self.cursor = Pos {
                        seg: seg + 1,
                        off: 0,
                    };
                    self.file = None;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "spool segment {seg} is unreadable at offset {} below its durable end",
                            self.cursor.off
                        ),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Releases everything up to `pos` (ClickHouse has it): persists the
    /// position and deletes segments wholly before it.
    pub fn ack(&mut self, pos: Pos) -> io::Result<()> {
        if pos <= self.acked {
            return Ok(());
        }
        let released = self.bytes_between(self.acked, pos)?;
        write_ack(&self.shared.dir, pos)?;
        for seq in self.acked.seg..pos.seg {
            match fs::remove_file(segment_path(&self.shared.dir, seq)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.acked = pos;
        self.shared.used.fetch_sub(
            released.min(self.shared.used.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
        if self.acked >= self.cursor {
            self.oldest_unacked_ms = None;
        }
        Ok(())
    }

    /// Record bytes between two positions (sealed segments count whole).
    fn bytes_between(&self, from: Pos, to: Pos) -> io::Result<u64> {
        if from.seg == to.seg {
            return Ok(to.off.saturating_sub(from.off));
        }
        let mut total = 0;
        for seq in from.seg..to.seg {
            let len = match fs::metadata(segment_path(&self.shared.dir, seq)) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            };
            total += if seq == from.seg {
                len.saturating_sub(from.off)
            } else {
                len
            };
        }
        Ok(total + to.off)
    }

    /// Keeps payload buffers of records done with, for later reads: a
    /// batch's worth of fresh buffers cost a page fault and zeroing per
    /// page every batch. At most 16 MiB are kept.
    pub fn recycle(&mut self, payloads: impl IntoIterator<Item = Vec<u8>>) {
        const KEEP_BYTES: usize = 16 << 20;
        let mut kept: usize = self.spare.iter().map(Vec::capacity).sum();
        for p in payloads {
            if kept + p.capacity() > KEEP_BYTES {
                break;
            }
            kept += p.capacity();
            self.spare.push(p);
        }
    }

    /// Forgets records read but not acknowledged: the next read starts again
    /// at the acknowledged position (after a failed insert that is not
    /// retried from memory).
    pub fn rewind(&mut self) {
        self.cursor = self.acked;
        self.file = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    /// Room for many concurrent appends without rotating or filling up.
    fn roomy_opts(dir: &Path) -> SpoolOptions {
        SpoolOptions {
            segment_bytes: 1 << 20,
            max_bytes: 64 << 20,
            ..opts(dir)
        }
    }

    fn opts(dir: &Path) -> SpoolOptions {
        SpoolOptions {
            dir: dir.to_path_buf(),
            max_bytes: 1 << 20,
            segment_bytes: 4096,
            commit_delay: Duration::ZERO,
            commit_interval: Duration::ZERO,
            health: None,
        }
    }

    fn read_all(r: &mut SpoolReader) -> Vec<Vec<u8>> {
        r.read(usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect()
    }

    /// Short writes (at most 7 bytes, interrupted every third call) and
    /// more buffers than one `writev` takes still write every byte in order.
    #[test]
    fn vectored_writes_survive_short_and_interrupted_writes() {
        struct Stingy {
            out: Vec<u8>,
            calls: usize,
        }
        impl Write for Stingy {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.write_vectored(&[io::IoSlice::new(b)])
            }
            fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
                self.calls += 1;
                if self.calls % 3 == 0 {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let mut n = 0;
                for b in bufs {
                    let take = b.len().min(7 - n);
                    self.out.extend_from_slice(&b[..take]);
                    n += take;
                    if n == 7 {
                        break;
                    }
                }
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let bufs: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![i as u8; (i % 5) as usize])
            .collect();
        let mut w = Stingy {
            out: Vec::new(),
            calls: 0,
        };
        write_all_vectored(&mut w, &bufs).unwrap();
        assert_eq!(w.out, bufs.concat());
        // Into a file, in one or a few calls.
        let mut f = tempfile::tempfile().unwrap();
        write_all_vectored(&mut f, &bufs).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back, bufs.concat());
    }

    #[tokio::test]
    async fn append_frame_writes_in_place_and_gives_the_buffer_back() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mut reader) = Spool::open(&opts(dir.path())).unwrap();
        let mut f = Frame::with_buffer(vec![0xee; 64]);
        f.extend_from_slice(b"payload");
        let ptr = f.payload().as_ptr();
        let back = spool.append_frame(f).await.unwrap();
        assert_eq!(
            back.payload().as_ptr(),
            ptr,
            "the same allocation comes back"
        );
        assert_eq!(back.payload(), b"payload");
        assert_eq!(read_all(&mut reader), [b"payload".to_vec()]);
        // The header is the one `frame` makes.
        let buf = back.into_buffer();
        let appended_ms = i64::from_le_bytes(buf[8..16].try_into().unwrap());
        assert_eq!(buf, frame(appended_ms, b"payload"));
    }

    #[tokio::test]
    async fn recycled_buffers_read_records_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mut reader) = Spool::open(&opts(dir.path())).unwrap();
        // Large then small: a reused buffer must not keep old bytes.
        let payloads: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; 2000 - 45 * usize::from(i)])
            .collect();
        for p in &payloads {
            spool.append(p).await.unwrap();
        }
        let mut got = Vec::new();
        loop {
            let batch = reader.read(7, usize::MAX).unwrap();
            if batch.is_empty() {
                break;
            }
            let payloads: Vec<Vec<u8>> = batch.into_iter().map(|r| r.payload).collect();
            got.extend(payloads.iter().cloned());
            reader.recycle(payloads);
        }
        assert_eq!(got, payloads);
    }

    #[tokio::test]
    async fn appends_read_back_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let payloads: Vec<Vec<u8>> = (0..100u32)
            .map(|i| vec![i as u8; 10 + i as usize * 3])
            .collect();
        {
            let (spool, mut reader) = Spool::open(&opts(dir.path())).unwrap();
            for p in &payloads {
                spool.append(p).await.unwrap();
            }
            assert_eq!(read_all(&mut reader), payloads);
            assert!(list_segments(dir.path()).unwrap().len() > 1, "rotated");
        }
        // Nothing acknowledged: everything comes back after a reopen.
        let (spool, mut reader) = Spool::open(&opts(dir.path())).unwrap();
        let total: u64 = payloads.iter().map(|p| p.len() as u64 + HEADER_LEN).sum();
        assert_eq!(spool.pending_bytes(), total);
        let records = reader.read(usize::MAX, usize::MAX).unwrap();
        assert_eq!(
            records
                .iter()
                .map(|r| r.payload.clone())
                .collect::<Vec<_>>(),
            payloads
        );
        // Acknowledge the first 60: only the rest comes back, old segments go.
        reader.ack(records[59].end).unwrap();
        let left = list_segments(dir.path()).unwrap();
        assert!(left[0] >= records[59].end.seg, "{left:?}");
        drop(reader);
        drop(spool);
        let (spool, mut reader) = Spool::open(&opts(dir.path())).unwrap();
        assert_eq!(read_all(&mut reader), payloads[60..].to_vec());
        let rest: u64 = payloads[60..]
            .iter()
            .map(|p| p.len() as u64 + HEADER_LEN)
            .sum();
        assert_eq!(spool.pending_bytes(), rest);
    }

    #[tokio::test]
    async fn ack_everything_drains_to_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mut reader) = Spool::open(&opts(dir.path())).unwrap();
        for i in 0..200u32 {
            spool.append(&i.to_le_bytes().repeat(20)).await.unwrap();
        }
        let recs = reader.read(usize::MAX, usize::MAX).unwrap();
        assert_eq!(recs.len(), 200);
        reader.ack(recs[199].end).unwrap();
        assert_eq!(spool.pending_bytes(), 0);
        assert_eq!(reader.oldest_unacked_ms(), None);
        assert!(list_segments(dir.path()).unwrap().len() <= 1);
    }

    /// Runs `tasks` appenders at once, appender `t` running `body(spool, t)`,
    /// and waits for all of them.
    async fn appenders<F, Fut>(spool: &Arc<Spool>, tasks: u32, body: F)
    where
        F: Fn(Arc<Spool>, u32) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let handles: Vec<_> = (0..tasks)
            .map(|t| tokio::spawn(body(spool.clone(), t)))
            .collect();
        for h in handles {
            h.await.unwrap();
        }
    }

    /// The committer's clock in tests: time moves only when the test says,
    /// and the test sees when the committer waits, and for how long.
    #[derive(Default)]
    struct TestClock {
        state: std::sync::Mutex<TestTime>,
        changed: std::sync::Condvar,
    }

    #[derive(Default)]
    struct TestTime {
        /// Time since the start.
        now: Duration,
        /// The committer sleeps until then.
        sleeping_until: Option<Duration>,
        /// The committer's next `now()` blocks until released.
        held: bool,
        /// The committer is blocked in `now()`.
        blocked: bool,
    }

    /// The bound on every wait for the committer (it answers in
    /// microseconds; this only keeps a broken committer from hanging).
    const COMMITTER_BOUND: Duration = Duration::from_secs(30);

    impl TestClock {
        fn start() -> Instant {
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            *START.get_or_init(Instant::now)
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, TestTime> {
            self.state.lock().unwrap()
        }

        /// Waits (bounded, in real time) until `ready` holds.
        fn wait_for(&self, what: &str, ready: impl Fn(&TestTime) -> bool) {
            let (s, timeout) = self
                .changed
                .wait_timeout_while(self.lock(), COMMITTER_BOUND, |s| !ready(s))
                .unwrap();
            assert!(!timeout.timed_out(), "the committer never {what}");
            drop(s);
        }

        /// The time the committer sleeps until, once it sleeps.
        fn sleeping_until(&self) -> Duration {
            self.wait_for("slept", |s| s.sleeping_until.is_some());
            self.lock().sleeping_until.unwrap()
        }

        fn advance_to(&self, t: Duration) {
            self.lock().now = t;
            self.changed.notify_all();
        }

        fn hold(&self) {
            self.lock().held = true;
        }

        fn wait_blocked(&self) {
            self.wait_for("looked at the clock", |s| s.blocked);
        }

        fn release(&self) {
            self.lock().held = false;
            self.changed.notify_all();
        }
    }

    /// The committer's side. Its waits are bounded too, so that a failed
    /// test (which never moves the clock) does not hang in the spool's
    /// drop, which joins the committer.
    impl CommitClock for Arc<TestClock> {
        fn now(&self) -> Instant {
            let mut s = self.lock();
            s.blocked = true;
            self.changed.notify_all();
            s = self
                .changed
                .wait_timeout_while(s, COMMITTER_BOUND, |s| s.held)
                .unwrap()
                .0;
            s.blocked = false;
            TestClock::start() + s.now
        }

        fn sleep(&self, d: Duration) {
            let mut s = self.lock();
            let until = s.now + d;
            s.sleeping_until = Some(until);
            self.changed.notify_all();
            s = self
                .changed
                .wait_timeout_while(s, COMMITTER_BOUND, |s| s.now < until)
                .unwrap()
                .0;
            s.sleeping_until = None;
        }
    }

    /// Starts `n` appends of 8 bytes each (ids `from..from + n`) and
    /// returns once all of them are queued for the committer. On the
    /// current-thread runtime an append reserves its bytes and sends its
    /// job without yielding in between, so the reserved bytes tell.
    async fn queue_appends(
        spool: &Arc<Spool>,
        from: u64,
        n: u64,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let before = spool.pending_bytes();
        let handles = (from..from + n)
            .map(|i| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.append(&i.to_le_bytes()).await.unwrap() })
            })
            .collect();
        let want = before + n * (HEADER_LEN + 8);
        while spool.pending_bytes() < want {
            tokio::task::yield_now().await;
        }
        handles
    }

    /// A spool on a [`TestClock`], shared as the appending tests use it,
    /// with the options `o` gives for a fresh directory (removed when the
    /// returned guard drops).
    fn open_clocked(
        o: impl FnOnce(&Path) -> SpoolOptions,
    ) -> (tempfile::TempDir, Arc<Spool>, SpoolReader, Arc<TestClock>) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock::default());
        let (spool, reader) =
            Spool::open_with_clock(&o(dir.path()), Box::new(clock.clone())).unwrap();
        (dir, Arc::new(spool), reader, clock)
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    /// After the first append of a group the committer waits
    /// `commit_delay` before it writes, and every append that arrives
    /// meanwhile shares the group's one fsync.
    #[tokio::test(flavor = "current_thread")]
    async fn the_commit_delay_groups_appends_spread_in_time() {
        let (_dir, spool, mut reader, clock) = open_clocked(|dir| SpoolOptions {
            commit_delay: Duration::from_millis(400),
            ..opts(dir)
        });
        let mut appends = queue_appends(&spool, 0, 1).await;
        let c = clock.clone();
        let until = blocking(move || c.sleeping_until()).await;
        assert_eq!(
            until,
            Duration::from_millis(400),
            "it waits the commit delay"
        );
        // Seven more, one by one while it waits.
        for i in 1..8 {
            appends.extend(queue_appends(&spool, i, 1).await);
        }
        assert_eq!(spool.syncs(), 0, "nothing is written before the delay");
        clock.advance_to(until);
        for a in appends {
            a.await.unwrap();
        }
        assert_eq!(spool.syncs(), 1, "eight appends, one group commit");
        assert_eq!(read_all(&mut reader).len(), 8);
    }

    /// A group starts no sooner than `commit_interval` after the previous
    /// one started, so the fsyncs per second are bounded, and the appends
    /// that arrive meanwhile share that group.
    #[tokio::test(flavor = "current_thread")]
    async fn the_commit_interval_bounds_group_commits() {
        let (_dir, spool, mut reader, clock) = open_clocked(|dir| SpoolOptions {
            commit_interval: Duration::from_millis(50),
            ..roomy_opts(dir)
        });
        // After a quiet spell a lone append is written at once.
        for a in queue_appends(&spool, 0, 1).await {
            a.await.unwrap();
        }
        assert_eq!(spool.syncs(), 1);
        let mut group_start = Duration::ZERO;
        for round in 1..=3u64 {
            let mut appends = queue_appends(&spool, round * 100, 1).await;
            let c = clock.clone();
            let until = blocking(move || c.sleeping_until()).await;
            assert_eq!(
                until,
                group_start + Duration::from_millis(50),
                "round {round}"
            );
            appends.extend(queue_appends(&spool, round * 100 + 1, 9).await);
            clock.advance_to(until);
            for a in appends {
                a.await.unwrap();
            }
            assert_eq!(spool.syncs(), 1 + round, "ten appends per group");
            group_start = until;
        }
        assert_eq!(read_all(&mut reader).len(), 31);
    }

    /// Appends that queue while the committer is busy go into its next
    /// group together, even with no delay and no interval: one fsync for
    /// 64 appends.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_appends_share_fsyncs() {
        let (_dir, spool, mut reader, clock) = open_clocked(roomy_opts);
        clock.hold();
        let mut appends = queue_appends(&spool, 0, 1).await;
        let c = clock.clone();
        blocking(move || c.wait_blocked()).await;
        appends.extend(queue_appends(&spool, 1, 63).await);
        clock.release();
        for a in appends {
            a.await.unwrap();
        }
        assert_eq!(spool.syncs(), 1, "64 appends, one group commit");
        let mut got = read_all(&mut reader);
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 64);
    }

    /// Many appenders at once, on the real clock: every append is on disk
    /// exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_each_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mut reader) = Spool::open(&roomy_opts(dir.path())).unwrap();
        let spool = Arc::new(spool);
        appenders(&spool, 64, |spool, t| async move {
            for i in 0..20u32 {
                spool
                    .append(&[t.to_le_bytes(), i.to_le_bytes()].concat())
                    .await
                    .unwrap();
            }
        })
        .await;
        let mut got = read_all(&mut reader);
        assert_eq!(got.len(), 1280);
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 1280);
    }

    #[tokio::test]
    async fn full_spool_refuses_then_accepts_after_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.max_bytes = 4096;
        let (spool, mut reader) = Spool::open(&o).unwrap();
        let p = vec![7u8; 1000];
        for _ in 0..4 {
            spool.append(&p).await.unwrap();
        }
        assert!(matches!(spool.append(&p).await, Err(SpoolError::Full)));
        let recs = reader.read(usize::MAX, usize::MAX).unwrap();
        reader.ack(recs[3].end).unwrap();
        spool.append(&p).await.unwrap();
    }

    /// An append cancelled while its group commit runs (the sender hung up)
    /// and whose commit then fails gives its bytes back: they stayed
    /// counted, and enough such appends filled the spool with nothing in it.
    #[tokio::test]
    async fn a_cancelled_append_whose_commit_fails_is_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.commit_delay = Duration::from_millis(300);
        let (spool, _reader) = Spool::open(&o).unwrap();
        spool.append(&[1u8; 3000]).await.unwrap();
        let used = spool.pending_bytes();
        // The next group needs a new segment, which cannot be created.
        fs::remove_dir_all(dir.path()).unwrap();
        let cancelled = tokio::time::timeout(Duration::from_millis(50), spool.append(&[2u8; 3000]));
        assert!(cancelled.await.is_err(), "cancelled while queued");
        assert!(spool.pending_bytes() > used, "reserved while queued");
        // The committer is past the commit delay and has failed the group
        // once a later append fails the same way.
        assert!(matches!(
            spool.append(&[3u8; 3000]).await,
            Err(SpoolError::Io(_))
        ));
        assert_eq!(spool.pending_bytes(), used);
    }

    /// A committer that dies (here its clock panics) poisons the spool and
    /// says so: later appends are refused at once (before anything is
    /// forwarded) and the spool is reported down, with the panic's message.
    #[tokio::test]
    async fn a_dead_committer_poisons_the_spool_and_reports_it() {
        struct BrokenClock;
        impl CommitClock for BrokenClock {
            fn now(&self) -> Instant {
                panic!("the commit clock broke")
            }
            fn sleep(&self, _: Duration) {}
        }
        let dir = tempfile::tempdir().unwrap();
        let health = Arc::new(crate::health::Health::default());
        let o = SpoolOptions {
            health: Some(health.reporter(crate::health::Component::Spool)),
            ..opts(dir.path())
        };
        let (spool, _reader) = Spool::open_with_clock(&o, Box::new(BrokenClock)).unwrap();
        assert!(matches!(
            spool.append(&[1u8; 100]).await,
            Err(SpoolError::Closed)
        ));
        // The report comes from the dying thread: wait for it (bounded).
        let deadline = Instant::now() + COMMITTER_BOUND;
        while health.live().is_ok() {
            assert!(
                Instant::now() < deadline,
                "the spool was never reported down"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            health.live().unwrap_err().to_string(),
            "the spool failed: it panicked: the commit clock broke; writes with cost samples are answered 503; restart rwgate"
        );
        assert!(matches!(
            spool.reserve(Frame::from_payload(&[2u8; 100])),
            Err(SpoolError::Poisoned)
        ));
    }

    /// A crash can leave any prefix of the last write on disk, and disks can
    /// flip bits: recovery keeps exactly the records before the damage, and
    /// appending works afterwards.
    #[tokio::test]
    async fn torn_and_corrupt_tails_are_truncated() {
        let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 50 + i as usize]).collect();
        let lens: Vec<u64> = payloads
            .iter()
            .map(|p| p.len() as u64 + HEADER_LEN)
            .collect();
        let total: u64 = lens.iter().sum();
        // Every byte around each record boundary, and a stride through the rest.
        let mut cuts: BTreeSet<u64> = (0..total).step_by(13).collect();
        let mut b = 0;
        for l in &lens {
            for d in 0..=HEADER_LEN + 1 {
                cuts.insert((b + d).min(total - 1));
                cuts.insert(b.saturating_sub(d));
            }
            b += l;
        }
        for &cut in &cuts {
            for corrupt in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                let mut o = opts(dir.path());
                o.segment_bytes = 1 << 20;
                let seg;
                {
                    let (spool, _r) = Spool::open(&o).unwrap();
                    for p in &payloads {
                        spool.append(p).await.unwrap();
                    }
                    seg = list_segments(dir.path()).unwrap()[0];
                }
                let path = segment_path(dir.path(), seg);
                let mut bytes = fs::read(&path).unwrap();
                if corrupt {
                    bytes[cut as usize] ^= 0x40;
                } else {
                    bytes.truncate(cut as usize);
                }
                fs::write(&path, &bytes).unwrap();
                // Records entirely before the damaged byte survive.
                let mut intact = 0;
                let mut end = 0;
                for l in &lens {
                    if end + l <= cut {
                        intact += 1;
                        end += l;
                    } else {
                        break;
                    }
                }
                let (spool, mut reader) = Spool::open(&o).unwrap();
                assert_eq!(
                    read_all(&mut reader),
                    payloads[..intact].to_vec(),
                    "cut {cut} corrupt {corrupt}"
                );
                assert_eq!(fs::metadata(&path).unwrap().len(), end);
                spool.append(b"after").await.unwrap();
                assert_eq!(read_all(&mut reader), vec![b"after".to_vec()]);
            }
        }
    }

    #[tokio::test]
    async fn rewind_rereads_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, mut reader) = Spool::open(&opts(dir.path())).unwrap();
        for i in 0..5u8 {
            spool.append(&[i]).await.unwrap();
        }
        let first = reader.read(2, usize::MAX).unwrap();
        reader.ack(first[1].end).unwrap();
        let _ = reader.read(10, usize::MAX).unwrap();
        reader.rewind();
        assert_eq!(read_all(&mut reader), vec![vec![2], vec![3], vec![4]]);
    }
}
