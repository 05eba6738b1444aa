//! The offline store's figures: durable enqueue (one item per commit, and group
//! commit), take+ack, open time with 100,000 queued items, bytes on disk per item, and
//! next to them the disk's own limit (append 200 bytes + fdatasync), all in one run.
//!
//! Files go to the system temporary directory when it is on a real disk, else next to
//! the bench binary (under `target/`): a tmpfs would make every fsync free and every
//! figure meaningless. The path and its filesystem are printed. Every store is opened
//! with the defaults (`synchronous = FULL`: each commit is fsynced) except that the
//! bounds are raised out of the way. Items are 200-byte bodies. Each figure is the
//! median of [`RUNS`] runs; each run is bounded in time and in count.
//!
//! Rates depend on the disk and on what else runs. Two things make them readable:
//!
//! - the fsync limit and the single-item enqueue are measured in alternation (fsync
//!   run, enqueue run, fsync run, …) and their ratio is the median of each pair's;
//! - each throughput figure also gives the **CPU time per item**: the process's user +
//!   system time during the run (from `/proc/self/stat`, all threads) over the items
//!   done. It barely moves with the load, and says what the store itself costs.
//!
//! `WEBWAKA_BENCH_STORE=single,take` runs only the named parts: `single` (with the
//! fsync limit), `writer`, `many`, `take`, `encrypted` (enqueue and take+ack, plaintext
//! and encrypted in turn), `open` (with the size); e.g. under `perf`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use webwaka_realtime::store::{
    ItemKind, NewItem, OutboxClass, Store, StoreConfig, StoreError, StoreWriter,
};

use super::{Row, fmt_rate, median, per_second, wanted};

/// Runs per figure (the median is reported).
const RUNS: usize = 5;
/// How long one throughput run lasts (at most).
const RUN_TIME: Duration = Duration::from_millis(1000);
/// Body size of every item, as stored (`{"text":"xx…"}`).
const BODY_BYTES: usize = 200;
/// Threads enqueueing concurrently through the writer, each waiting for its item.
const WRITER_THREADS: usize = 64;
/// Threads submitting through the writer without waiting, and how many items each
/// keeps outstanding (as an async app's many tasks, each awaiting its enqueue).
const SUBMIT_THREADS: usize = 4;
const SUBMIT_WINDOW: usize = 512;
/// Items per `enqueue_many` call.
const MANY_BATCH: usize = 100;
/// Take+ack: items queued, lanes they are spread over, items per take/ack call.
const TAKE_ITEMS: usize = 20_000;
const TAKE_LANES: usize = 100;
const TAKE_BATCH: usize = 100;
/// Items queued for the open-time and size figures, and their lanes.
const OPEN_ITEMS: usize = 100_000;
const OPEN_LANES: usize = 1_000;

/// One throughput run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Items per second.
    rate: f64,
    /// Process CPU time per item, in µs (`None` where it cannot be read).
    cpu_us: Option<f64>,
    /// Items per commit, where the run knows it.
    per_commit: Option<f64>,
    /// The writer thread's own CPU time per item, in µs, for writer runs.
    writer_us: Option<f64>,
}

/// The medians of several runs.
struct Summary {
    rate: f64,
    cpu_us: Option<f64>,
    per_commit: Option<f64>,
    writer_us: Option<f64>,
}

impl Summary {
    fn of(samples: &[Sample]) -> Summary {
        let median_of = |f: fn(&Sample) -> Option<f64>| {
            let mut values: Vec<f64> = samples.iter().filter_map(f).collect();
            (!values.is_empty()).then(|| median(&mut values))
        };
        let mut rates: Vec<f64> = samples.iter().map(|s| s.rate).collect();
        Summary {
            rate: median(&mut rates),
            cpu_us: median_of(|s| s.cpu_us),
            per_commit: median_of(|s| s.per_commit),
            writer_us: median_of(|s| s.writer_us),
        }
    }

    /// `the writer thread: 12 µs/item (ceiling 83,333/s with a core of its own); ` when
    /// known.
    fn writer(&self) -> String {
        self.writer_us
            .map(|us| {
                format!(
                    "the writer thread alone: CPU {us:.1} µs/item (ceiling {} with a core of its \
                     own); ",
                    fmt_rate(1e6 / us.max(1e-3))
                )
            })
            .unwrap_or_default()
    }

    /// `12,345/s (CPU 40 µs/item)`.
    fn figure(&self) -> String {
        match self.cpu_us {
            Some(cpu) => format!("{} (CPU {cpu:.0} µs/item)", fmt_rate(self.rate)),
            None => fmt_rate(self.rate),
        }
    }

    /// `mean 48 items per commit; ` when known.
    fn commits(&self) -> String {
        self.per_commit
            .map(|n| format!("mean {n:.0} items per commit; "))
            .unwrap_or_default()
    }
}

/// `RUNS` runs of `f`, summarised.
fn runs(mut f: impl FnMut() -> Result<Sample, StoreError>) -> Result<Summary, StoreError> {
    let samples = (0..RUNS).map(|_| f()).collect::<Result<Vec<_>, _>>()?;
    Ok(Summary::of(&samples))
}

/// Runs the store benchmarks; `Err` when the store or the disk failed.
pub fn run() -> Result<Vec<Row>, StoreError> {
    let dir = BenchDir::new()?;
    eprintln!("store bench: files in {} ({})", dir.path.display(), dir.fs);
    let ms = RUN_TIME.as_millis();
    let mut rows = Vec::new();

    if wanted("WEBWAKA_BENCH_STORE", "single") {
        let (mut fsyncs, mut singles, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let fsync = fsync_rate(&dir.file("fsync.log"))?;
            let single = single_enqueue(&dir, config())?;
            ratios.push(single.rate / fsync);
            fsyncs.push(fsync);
            singles.push(single);
        }
        let single = Summary::of(&singles);
        rows.push(Row {
            name: "disk: append 200 B + fdatasync".into(),
            figure: fmt_rate(median(&mut fsyncs)),
            method: format!(
                "the physical limit: one file, write 200 bytes at its end then fdatasync, in a \
                 loop for {ms} ms; median of {RUNS} runs, alternating with the next row's; {}",
                dir.fs
            ),
        });
        rows.push(Row {
            name: "store: durable enqueue, 1 item per commit".into(),
            figure: format!("{}, {:.2} × fsync", single.figure(), median(&mut ratios)),
            method: format!(
                "Store::enqueue of one {BODY_BYTES}-byte item per call, synchronous=FULL (each \
                 commit fsynced), one thread, new store per run, {ms} ms; median of {RUNS} runs; \
                 ratio: median over runs of the rate / the fsync rate measured just before; \
                 target ≥ 0.8 × fsync"
            ),
        });
    }

    if wanted("WEBWAKA_BENCH_STORE", "writer") {
        let blocking = runs(|| writer_enqueue(&dir))?;
        rows.push(Row {
            name: "store: group commit, StoreWriter::enqueue".into(),
            figure: blocking.figure(),
            method: format!(
                "{WRITER_THREADS} threads each calling StoreWriter::enqueue (blocking: one item \
                 at a time per thread) in a loop, {ms} ms, synchronous=FULL; {}{}median of \
                 {RUNS} runs; target ≥ 50,000/s",
                blocking.commits(),
                blocking.writer()
            ),
        });
        let submitted = runs(|| writer_submit(&dir))?;
        rows.push(Row {
            name: "store: group commit, StoreWriter::submit".into(),
            figure: submitted.figure(),
            method: format!(
                "{SUBMIT_THREADS} threads each keeping {SUBMIT_WINDOW} StoreWriter::submit calls \
                 outstanding (as many async tasks awaiting their enqueue), {ms} ms, \
                 synchronous=FULL; {}{}median of {RUNS} runs; target ≥ 50,000/s",
                submitted.commits(),
                submitted.writer()
            ),
        });
    }

    if wanted("WEBWAKA_BENCH_STORE", "many") {
        let many = runs(|| enqueue_many(&dir))?;
        rows.push(Row {
            name: "store: group commit, enqueue_many".into(),
            figure: many.figure(),
            method: format!(
                "Store::enqueue_many of {MANY_BATCH} items per call (one commit), one thread, \
                 {ms} ms, synchronous=FULL; median of {RUNS} runs"
            ),
        });
    }

    if wanted("WEBWAKA_BENCH_STORE", "take") {
        let take = runs(|| take_ack(&dir, config()))?;
        rows.push(Row {
            name: "store: take+ack".into(),
            figure: take.figure(),
            method: format!(
                "{TAKE_ITEMS} items queued on {TAKE_LANES} lanes, drained by rounds of \
                 Store::take_sendable({TAKE_BATCH}) (next_sendable + mark_in_flight, one commit) \
                 then Store::mark_accepted_many (one commit); synchronous=FULL; median of {RUNS} \
                 runs; target ≥ 25,000/s"
            ),
        });
    }

    if cfg!(feature = "encryption") && wanted("WEBWAKA_BENCH_STORE", "encrypted") {
        rows.extend(encryption_cost(&dir)?);
    }

    if wanted("WEBWAKA_BENCH_STORE", "open") {
        let (open_ms, file_bytes) = open_and_size(&dir)?;
        rows.push(Row {
            name: "store: open with 100,000 queued".into(),
            figure: format!("{open_ms:.1} ms"),
            method: format!(
                "Store::open of a file holding {OPEN_ITEMS} queued items on {OPEN_LANES} lanes \
                 (the {OPEN_LANES} heads in flight at close, recovered at open), after a clean \
                 close; median of {RUNS} opens; target ≤ 100 ms"
            ),
        });
        rows.push(Row {
            name: "store: bytes on disk per queued item".into(),
            figure: format!("{:.0} B", file_bytes as f64 / OPEN_ITEMS as f64),
            method: format!(
                "database file + WAL after the store is closed (checkpointed), {file_bytes} \
                 bytes, over {OPEN_ITEMS} queued items of {BODY_BYTES}-byte bodies"
            ),
        });
    }
    Ok(rows)
}

/// A 200-byte item on `lane`.
fn item(lane: &str) -> NewItem {
    // {"text":"…"} is 11 bytes around the text.
    NewItem::new(
        OutboxClass::C,
        ItemKind::Message,
        lane,
        json!({ "text": "x".repeat(BODY_BYTES - 11) }),
    )
}

/// What encryption costs: the durable enqueue and take+ack, each run in turn on a
/// plaintext store and on an encrypted one (SQLCipher, a raw 256-bit key), so that both
/// see the same disk and load.
fn encryption_cost(dir: &BenchDir) -> Result<Vec<Row>, StoreError> {
    let key = webwaka_realtime::store::StoreKey::from_bytes(&[0x5a; 32])?;
    let encrypted = || -> Result<StoreConfig, StoreError> {
        Ok(StoreConfig {
            key: Some(key.clone()),
            ..config()
        })
    };
    let (mut plain_single, mut enc_single, mut plain_take, mut enc_take) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        plain_single.push(single_enqueue(dir, config())?);
        enc_single.push(single_enqueue(dir, encrypted()?)?);
        plain_take.push(take_ack(dir, config())?);
        enc_take.push(take_ack(dir, encrypted()?)?);
    }
    let ms = RUN_TIME.as_millis();
    let pair = |plain: &[Sample], enc: &[Sample]| {
        let (plain, enc) = (Summary::of(plain), Summary::of(enc));
        format!(
            "{} → {} ({:.2} ×)",
            plain.figure(),
            enc.figure(),
            enc.rate / plain.rate.max(1e-9)
        )
    };
    Ok(vec![
        Row {
            name: "store: durable enqueue, plaintext → encrypted".into(),
            figure: pair(&plain_single, &enc_single),
            method: format!(
                "as the durable enqueue row ({BODY_BYTES}-byte items, one per commit, \
                 synchronous=FULL, {ms} ms), on a plaintext store and on an encrypted one \
                 (SQLCipher, raw 256-bit key, 2 KiB pages as the plaintext store) in turn; median of {RUNS} runs each"
            ),
        },
        Row {
            name: "store: take+ack, plaintext → encrypted".into(),
            figure: pair(&plain_take, &enc_take),
            method: format!(
                "as the take+ack row ({TAKE_ITEMS} items on {TAKE_LANES} lanes, rounds of \
                 {TAKE_BATCH}), on a plaintext store and on an encrypted one in turn; median of \
                 {RUNS} runs each"
            ),
        },
    ])
}

/// The bounds out of the way; everything else as an app gets it.
fn config() -> StoreConfig {
    StoreConfig {
        max_items: 10_000_000,
        max_bytes: 1 << 40,
        ..StoreConfig::default()
    }
}

/// The process's CPU time (user + system, all threads) so far, from `/proc/self/stat`
/// (clock ticks of 10 ms); `None` off Linux.
pub(super) fn process_cpu() -> Option<Duration> {
    cpu_of(Path::new("/proc/self/stat"))
}

/// The `/proc/self/task/<tid>/stat` of the store writer's thread (named
/// `webwaka-store-writer`, which the kernel cuts to 15 bytes), if there is one.
fn writer_thread_stat() -> Option<PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .filter_map(Result::ok)
        .map(|task| task.path())
        .find(|task| {
            std::fs::read_to_string(task.join("comm"))
                .is_ok_and(|name| "webwaka-store-writer".starts_with(name.trim()))
        })
        .map(|task| task.join("stat"))
}

/// CPU time (user + system) from a `/proc` `stat` file.
fn cpu_of(stat_file: &Path) -> Option<Duration> {
    let stat = std::fs::read_to_string(stat_file).ok()?;
    // The fields after the command name (in parentheses, which may hold spaces) start
    // at field 3; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Clock and CPU time of one run.
struct Stopwatch {
    started: Instant,
    cpu: Option<Duration>,
}

impl Stopwatch {
    fn start() -> Stopwatch {
        Stopwatch {
            started: Instant::now(),
            cpu: process_cpu(),
        }
    }

    /// The sample for `items` done since the start.
    fn sample(&self, items: usize, per_commit: Option<f64>) -> Sample {
        let elapsed = self.started.elapsed();
        let cpu_us = match (self.cpu, process_cpu()) {
            (Some(before), Some(after)) if items > 0 => {
                Some((after.saturating_sub(before)).as_secs_f64() * 1e6 / items as f64)
            }
            _ => None,
        };
        Sample {
            rate: per_second(items, elapsed),
            cpu_us,
            per_commit,
            writer_us: None,
        }
    }
}

/// (a) Appends of 200 bytes, each followed by fdatasync, per second.
fn fsync_rate(path: &Path) -> Result<f64, StoreError> {
    let _ = std::fs::remove_file(path);
    let mut file: File = OpenOptions::new().create(true).append(true).open(path)?;
    let record = [b'x'; BODY_BYTES];
    let started = Instant::now();
    let mut count = 0;
    while started.elapsed() < RUN_TIME && count < 1_000_000 {
        file.write_all(&record)?;
        file.sync_data()?;
        count += 1;
    }
    let rate = per_second(count, started.elapsed());
    drop(file);
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// (b) `Store::enqueue`, one item per commit.
fn single_enqueue(dir: &BenchDir, config: StoreConfig) -> Result<Sample, StoreError> {
    let path = dir.fresh("single.db")?;
    let mut store = Store::open(&path, config)?;
    let clock = Stopwatch::start();
    let mut count = 0;
    while clock.started.elapsed() < RUN_TIME && count < 1_000_000 {
        store.enqueue(item("room:1"), Utc::now())?;
        count += 1;
    }
    Ok(clock.sample(count, Some(1.0)))
}

/// (c) `StoreWriter::enqueue` from many threads, each waiting for its item.
fn writer_enqueue(dir: &BenchDir) -> Result<Sample, StoreError> {
    let path = dir.fresh("writer.db")?;
    let writer = StoreWriter::open(&path, config())?;
    let load = Load::new(WRITER_THREADS);
    let threads: Vec<_> = (0..WRITER_THREADS)
        .map(|t| {
            let (writer, load) = (writer.clone(), load.clone());
            let lane = format!("room:{t}");
            thread::spawn(move || {
                load.start.wait();
                // Bounded by `stop` (set after RUN_TIME) and by count.
                for _ in 0..10_000_000 {
                    if load.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = writer.enqueue(item(&lane), Utc::now()) {
                        let _ = load.errors.send(e);
                        break;
                    }
                    load.done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let sample = load.run(&writer)?;
    for t in threads {
        let _ = t.join();
    }
    load.first_error()?;
    writer.close()?;
    Ok(sample)
}

/// (c) `StoreWriter::submit` with `SUBMIT_WINDOW` items outstanding per thread.
fn writer_submit(dir: &BenchDir) -> Result<Sample, StoreError> {
    let path = dir.fresh("submit.db")?;
    let writer = StoreWriter::open(&path, config())?;
    let load = Load::new(SUBMIT_THREADS);
    let threads: Vec<_> = (0..SUBMIT_THREADS)
        .map(|t| {
            let (writer, load) = (writer.clone(), load.clone());
            let lane = format!("room:{t}");
            thread::spawn(move || {
                // Each reply comes back on this thread's channel.
                let (reply, replies) = mpsc::channel::<Result<(), StoreError>>();
                let mut outstanding = 0;
                load.start.wait();
                // Bounded by `stop` (set after RUN_TIME) and by count.
                for _ in 0..10_000_000 {
                    if load.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    while outstanding < SUBMIT_WINDOW {
                        let reply = reply.clone();
                        writer.submit(item(&lane), Utc::now(), move |r| {
                            let _ = reply.send(r.map(|_| ()));
                        });
                        outstanding += 1;
                    }
                    match replies.recv() {
                        Ok(Ok(())) => {
                            outstanding -= 1;
                            load.done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            let _ = load.errors.send(e);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // What is still outstanding completes when the writer is closed.
            })
        })
        .collect();
    let sample = load.run(&writer)?;
    for t in threads {
        let _ = t.join();
    }
    load.first_error()?;
    writer.close()?;
    Ok(sample)
}

/// What the threads of a writer run share with the bench.
#[derive(Clone)]
struct Load {
    start: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    errors: mpsc::Sender<StoreError>,
    first_error: Arc<std::sync::Mutex<mpsc::Receiver<StoreError>>>,
}

impl Load {
    fn new(threads: usize) -> Load {
        let (errors, first_error) = mpsc::channel();
        Load {
            start: Arc::new(Barrier::new(threads + 1)),
            stop: Arc::new(AtomicBool::new(false)),
            done: Arc::new(AtomicUsize::new(0)),
            errors,
            first_error: Arc::new(std::sync::Mutex::new(first_error)),
        }
    }

    /// Starts the threads, lets them run for `RUN_TIME`, stops them: the sample.
    fn run(&self, writer: &StoreWriter) -> Result<Sample, StoreError> {
        let before = writer.stats();
        let writer_stat = writer_thread_stat();
        let writer_before = writer_stat.as_deref().and_then(cpu_of);
        self.start.wait();
        let clock = Stopwatch::start();
        thread::sleep(RUN_TIME);
        let done = self.done.load(Ordering::Relaxed);
        let after = writer.stats();
        let writer_after = writer_stat.as_deref().and_then(cpu_of);
        let mut sample = clock.sample(
            done,
            Some(
                (after.items - before.items) as f64
                    / (after.batches - before.batches).max(1) as f64,
            ),
        );
        sample.writer_us = match (writer_before, writer_after) {
            (Some(b), Some(a)) if done > 0 => {
                Some(a.saturating_sub(b).as_secs_f64() * 1e6 / done as f64)
            }
            _ => None,
        };
        self.stop.store(true, Ordering::Relaxed);
        Ok(sample)
    }

    fn first_error(&self) -> Result<(), StoreError> {
        let errors = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match errors.try_recv() {
            Ok(e) => Err(e),
            Err(_) => Ok(()),
        }
    }
}

/// (c) `Store::enqueue_many` of `MANY_BATCH` items per call.
fn enqueue_many(dir: &BenchDir) -> Result<Sample, StoreError> {
    let path = dir.fresh("many.db")?;
    let mut store = Store::open(&path, config())?;
    let clock = Stopwatch::start();
    let mut count = 0;
    while clock.started.elapsed() < RUN_TIME && count < 10_000_000 {
        let batch = (0..MANY_BATCH).map(|_| item("room:1")).collect();
        store.enqueue_many(batch, Utc::now())?;
        count += MANY_BATCH;
    }
    Ok(clock.sample(count, Some(MANY_BATCH as f64)))
}

/// Fills a new store at `path` with `items` items spread over `lanes` lanes.
fn filled(
    path: &Path,
    items: usize,
    lanes: usize,
    config: StoreConfig,
) -> Result<Store, StoreError> {
    let mut store = Store::open(path, config)?;
    let names: Vec<String> = (0..lanes).map(|l| format!("room:{l}")).collect();
    let mut n = 0;
    while n < items {
        let batch: Vec<NewItem> = (n..items.min(n + 1000))
            .map(|i| item(&names[i % lanes]))
            .collect();
        n += batch.len();
        store.enqueue_many(batch, Utc::now())?;
    }
    Ok(store)
}

/// (d) Take (next sendable + in flight) and ack, in batches; the queue is made first.
fn take_ack(dir: &BenchDir, config: StoreConfig) -> Result<Sample, StoreError> {
    let mut store = filled(&dir.fresh("take.db")?, TAKE_ITEMS, TAKE_LANES, config)?;
    let clock = Stopwatch::start();
    let mut done = 0;
    // Bounded: each round settles at least one item, or stops.
    for _ in 0..TAKE_ITEMS {
        let now = Utc::now();
        let taken = store.take_sendable(now, TAKE_BATCH)?;
        if taken.is_empty() {
            break;
        }
        let acks: Vec<(&str, Option<&str>)> =
            taken.iter().map(|i| (i.id.as_str(), Some("42"))).collect();
        for result in store.mark_accepted_many(&acks, now)? {
            result?;
        }
        done += taken.len();
    }
    let sample = clock.sample(done, None);
    if done != TAKE_ITEMS {
        return Err(StoreError::Invalid {
            field: "bench",
            message: format!("take+ack settled {done} of {TAKE_ITEMS} items"),
        });
    }
    Ok(sample)
}

/// (e) and (f): the median open time in ms with `OPEN_ITEMS` queued, and the bytes on
/// disk.
fn open_and_size(dir: &BenchDir) -> Result<(f64, u64), StoreError> {
    let path = dir.fresh("open.db")?;
    {
        let mut store = filled(&path, OPEN_ITEMS, OPEN_LANES, config())?;
        // The head of every lane in flight, as when an app is killed while sending.
        store.take_sendable(Utc::now(), OPEN_LANES)?;
    } // closed: the last connection checkpoints the WAL and removes it
    let file_bytes = disk_bytes(&path)?;
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        let store = Store::open(&path, config())?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        let depth = store.depth()?;
        if depth.items != OPEN_ITEMS {
            return Err(StoreError::Invalid {
                field: "bench",
                message: format!("{} items after open", depth.items),
            });
        }
    }
    Ok((median(&mut samples), file_bytes))
}

/// The database file plus its WAL, if any.
fn disk_bytes(path: &Path) -> Result<u64, StoreError> {
    let mut total = std::fs::metadata(path)?.len();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if let Ok(meta) = std::fs::metadata(PathBuf::from(wal)) {
        total += meta.len();
    }
    Ok(total)
}

/// The directory the bench writes in, removed when done.
struct BenchDir {
    path: PathBuf,
    /// e.g. `ext4 (/dev/vda on /)`.
    fs: String,
}

impl BenchDir {
    /// Under the system temporary directory, unless it is a tmpfs: then next to the
    /// bench binary (the target directory, on the disk the project is built on).
    fn new() -> Result<BenchDir, StoreError> {
        let temp = std::env::temp_dir();
        let base = match filesystem_of(&temp) {
            Some((kind, _, _)) if kind != "tmpfs" && kind != "ramfs" => temp,
            _ => std::env::current_exe()?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let path = base.join(format!("webwaka-store-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        let fs = match filesystem_of(&path) {
            Some((kind, device, mount)) => format!("{kind} ({device} on {mount})"),
            None => "filesystem unknown".into(),
        };
        Ok(BenchDir { path, fs })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A path for a new store: whatever an earlier run left there is removed.
    fn fresh(&self, name: &str) -> Result<PathBuf, StoreError> {
        let path = self.file(name);
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            match std::fs::remove_file(PathBuf::from(p)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(path)
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// (type, device, mount point) of the filesystem holding `path`, from /proc/mounts
/// (the longest mount point that is a prefix of the path). `None` off Linux.
fn filesystem_of(path: &Path) -> Option<(String, String, String)> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let device = fields.next()?;
            let mount = fields.next()?.replace("\\040", " ");
            let kind = fields.next()?;
            path.starts_with(&mount)
                .then(|| (kind.to_owned(), device.to_owned(), mount))
        })
        .max_by_key(|(_, _, mount)| mount.len())
}
