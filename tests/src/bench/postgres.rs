//! The server benchmarks on PostgreSQL (issue 12), beside SQLite in the same run: part
//! `postgres` of the `server` group (`WEBWAKA_BENCH_SERVER=postgres` alone).
//!
//! A private PostgreSQL cluster (`scripts/pg-cluster.sh`: fsync on, the defaults but
//! `shared_buffers=128MB`, with `pg_stat_statements`) runs on the same two cores as the
//! server instances and the load generator. The server children are the same as the
//! SQLite rows' (this binary with `WEBWAKA_BENCH_CHILD=server`); the engine settings
//! reach them through the environment ([`engine_env`]). Figures:
//!
//! - durable messages/s and CPU per message: SQLite at `synchronous=NORMAL` (the
//!   default) and `FULL`, PostgreSQL at `synchronous_commit=on` (its default) and `off`,
//!   one instance each, and three instances on one PostgreSQL; the database's CPU per
//!   message and its statements per message (`pg_stat_statements`) beside;
//! - cross-instance delivery latency against same-instance, in alternating rounds;
//! - fan-out to 1,000 members spread over three instances;
//! - polls/s and memory per idle connection of an instance on PostgreSQL.
//!
//! Parts: `WEBWAKA_BENCH_POSTGRES=durable,cross,fanout,polls,idle` (all by default); the
//! durable rows' setups: `WEBWAKA_BENCH_DURABLE=sqlite-normal,sqlite-full,pg-on,pg-off,pg-on-3`.

use std::sync::Mutex;

use webwaka_realtime::protocol::InteractionClass;
use webwaka_server_stub::Config;
use webwaka_server_stub::config::{Durability, SynchronousCommit};

use super::server::{
    CHILD_SERVER, ChildProc, FANOUT_MEMBERS, FANOUT_RUNS, POLL_CLIENTS, ROUND_TRIPS, ROUNDS, RUNS,
    THROUGHPUT_CONNS, THROUGHPUT_PER_CONN, THROUGHPUT_WINDOW, WARMUP, connect_user, fanout_on,
    idle, message_frame, poll_run, proc_cpu_secs, round_trips, throughput_on,
};
use super::{Row, fmt_rate, median, percentile, sorted, wanted};
use crate::cluster::PgCluster;

/// Selects parts of this group (`durable,cross,fanout,polls,idle`, all by default).
pub const ONLY_ENV: &str = "WEBWAKA_BENCH_POSTGRES";
/// A server child makes a fresh database on this cluster (its admin URL).
const PG_ADMIN_ENV: &str = "WEBWAKA_BENCH_PG_ADMIN";
/// A server child uses this database (several instances share it).
const DATABASE_ENV: &str = "WEBWAKA_BENCH_DATABASE_URL";
/// Selects setups of the durable rows (`sqlite-normal,sqlite-full,pg-on,pg-off,pg-on-3`,
/// all by default), for profiling one of them.
const DURABLE_ENV: &str = "WEBWAKA_BENCH_DURABLE";
/// `sqlite-full`, `pg-on` or `pg-off`; unset: the defaults.
const DURABILITY_ENV: &str = "WEBWAKA_BENCH_DURABILITY";

/// The engine settings every server child gets now.
static ENGINE: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The engine settings for the server children spawned now.
pub fn engine_env() -> Vec<(String, String)> {
    ENGINE.lock().map(|e| e.clone()).unwrap_or_default()
}

/// Server children spawned while this lives get `env`.
struct Engine;

impl Engine {
    fn set(env: &[(&str, &str)]) -> Engine {
        if let Ok(mut engine) = ENGINE.lock() {
            *engine = env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        }
        Engine
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(mut engine) = ENGINE.lock() {
            engine.clear();
        }
    }
}

/// The child side: the engine its environment names.
pub async fn configure_child(config: &mut Config) -> Result<(), String> {
    match std::env::var(DURABILITY_ENV).as_deref() {
        Ok("sqlite-full") => config.durability = Durability::Full,
        Ok("pg-on") => config.database_synchronous_commit = Some(SynchronousCommit::On),
        Ok("pg-off") => config.database_synchronous_commit = Some(SynchronousCommit::Off),
        _ => {}
    }
    if let Ok(url) = std::env::var(DATABASE_ENV) {
        config.database_url = Some(url);
    } else if let Ok(admin) = std::env::var(PG_ADMIN_ENV) {
        config.database_url = Some(webwaka_server_stub::testing::fresh_database(&admin).await?);
    }
    Ok(())
}

/// CPU seconds the cluster's processes (the postmaster and its children) used so far.
fn pg_cpu(postmaster: u32) -> Result<f64, String> {
    let mut total = proc_cpu_secs(postmaster)?.0;
    let dir = std::fs::read_dir("/proc").map_err(|e| e.to_string())?;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok((cpu, ppid)) = proc_cpu_secs(pid)
            && ppid == postmaster
        {
            total += cpu;
        }
    }
    Ok(total)
}

/// Runs one SQL statement on the cluster's admin database; the first row's first
/// column, if an integer.
async fn admin_sql(url: &str, sql: &str) -> Result<Option<i64>, String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let rows = client.query(sql, &[]).await.map_err(|e| e.to_string());
    drop(client);
    let _ = driver.await;
    Ok(rows?.first().and_then(|r| r.try_get::<_, i64>(0).ok()))
}

/// Statements the server instances sent, counted by `pg_stat_statements` (every
/// database but the admin one).
async fn statements(url: &str) -> Result<i64, String> {
    admin_sql(
        url,
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements
         WHERE dbid <> (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .await
    .map(|n| n.unwrap_or(0))
}

/// Reads of new events by the instances' feeds (the catch-up read of
/// `store::postgres::events_after`: a gap the notifications did not fill), counted by
/// `pg_stat_statements`.
async fn catch_up_reads(url: &str) -> Result<i64, String> {
    admin_sql(
        url,
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements
         WHERE dbid <> (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query LIKE 'SELECT seq, event_id, created_ms, recipient_id, room_id, sender_id, body FROM events%'",
    )
    .await
    .map(|n| n.unwrap_or(0))
}

/// The durable throughput rows of one setup: (name, env, instances).
struct Setup {
    /// Its name in [`DURABLE_ENV`].
    key: &'static str,
    name: &'static str,
    env: Vec<(&'static str, String)>,
    instances: usize,
}

/// Runs the benchmarks on PostgreSQL.
pub async fn run() -> Result<Vec<Row>, String> {
    let pg = PgCluster::start();
    let admin = pg.url.clone();
    let postmaster = pg.postmaster_pid().ok_or("no postmaster pid")?;
    admin_sql(&admin, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await?;
    let mut rows = Vec::new();
    if wanted(ONLY_ENV, "durable") {
        rows.extend(durable(&admin, postmaster).await?);
    }
    if wanted(ONLY_ENV, "cross") {
        rows.extend(cross_instance(&admin).await?);
    }
    if wanted(ONLY_ENV, "fanout") {
        rows.extend(fanout_spread(&admin).await?);
    }
    {
        let _engine = Engine::set(&[(PG_ADMIN_ENV, &admin)]);
        if wanted(ONLY_ENV, "polls") {
            rows.extend(polls_pg().await?);
        }
        if wanted(ONLY_ENV, "idle") {
            let idle = idle().await?;
            rows.extend(idle.into_iter().map(|mut row| {
                row.name = format!("{} (PostgreSQL)", row.name);
                row
            }));
        }
    }
    drop(pg);
    Ok(rows)
}

/// Durable messages/s on each engine at each setting, and on three instances.
async fn durable(admin: &str, postmaster: u32) -> Result<Vec<Row>, String> {
    let setups = [
        Setup {
            key: "sqlite-normal",

            name: "SQLite, synchronous=NORMAL (default)",
            env: vec![],
            instances: 1,
        },
        Setup {
            key: "sqlite-full",

            name: "SQLite, synchronous=FULL",
            env: vec![(DURABILITY_ENV, "sqlite-full".into())],
            instances: 1,
        },
        Setup {
            key: "pg-on",

            name: "PostgreSQL, synchronous_commit=on (default), 1 instance",
            env: vec![(DURABILITY_ENV, "pg-on".into())],
            instances: 1,
        },
        Setup {
            key: "pg-off",

            name: "PostgreSQL, synchronous_commit=off, 1 instance",
            env: vec![(DURABILITY_ENV, "pg-off".into())],
            instances: 1,
        },
        Setup {
            key: "pg-on-3",

            name: "PostgreSQL, synchronous_commit=on, 3 instances",
            env: vec![(DURABILITY_ENV, "pg-on".into())],
            instances: 3,
        },
    ];
    let mut rows = Vec::new();
    for setup in setups {
        if !wanted(DURABLE_ENV, setup.key) {
            continue;
        }
        let postgres = setup.name.starts_with("PostgreSQL");
        let (mut rates, mut cpus, mut db_cpus, mut per_message) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut reads_per_message = Vec::new();
        for _ in 0..RUNS {
            let mut env: Vec<(&str, String)> = setup.env.clone();
            if postgres {
                // One database for the run's instances.
                let url = webwaka_server_stub::testing::fresh_database(admin).await?;
                env.push((DATABASE_ENV, url));
            }
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let _engine = Engine::set(&env);
            let mut servers = Vec::with_capacity(setup.instances);
            for _ in 0..setup.instances {
                servers.push(ChildProc::spawn(CHILD_SERVER)?);
            }
            let (before, reads_before) = if postgres {
                (statements(admin).await?, catch_up_reads(admin).await?)
            } else {
                (0, 0)
            };
            let cpu_of_db = || {
                if postgres {
                    pg_cpu(postmaster)
                } else {
                    Ok(0.0)
                }
            };
            let t = throughput_on(servers, InteractionClass::ClassC, cpu_of_db).await?;
            if postgres {
                let after = statements(admin).await?;
                per_message.push((after - before) as f64 / t.messages as f64);
                let reads = catch_up_reads(admin).await?;
                reads_per_message.push((reads - reads_before) as f64 / t.messages as f64);
            }
            rates.push(t.rate);
            cpus.push(t.cpu_us_per_message);
            db_cpus.push(t.other_us_per_message);
        }
        let (rate, cpu) = (median(&mut rates), median(&mut cpus));
        let mut figure = format!(
            "{} (runs {}–{}); server CPU {cpu:.1} µs per message",
            fmt_rate(rate),
            fmt_rate(rates[0]),
            fmt_rate(rates[RUNS - 1])
        );
        if postgres {
            let db = median(&mut db_cpus);
            let statements = median(&mut per_message);
            let reads = median(&mut reads_per_message);
            figure.push_str(&format!(
                ", PostgreSQL CPU {db:.1} µs per message, {statements:.2} statements per \
                 message (of which catch-up reads of new events {reads:.4})"
            ));
        }
        rows.push(Row {
            name: format!("server: durable messages/s, {}", setup.name),
            figure,
            method: format!(
                "{THROUGHPUT_CONNS} WebSocket connections (connection i on instance i mod {n}: \
                 sender and recipient on different instances when several) each send \
                 {THROUGHPUT_PER_CONN} CLASS_C direct messages to the next user, at most \
                 {THROUGHPUT_WINDOW} awaiting their ack; clock until all {} are delivered; \
                 server CPU = utime+stime of the instances, PostgreSQL CPU = the postmaster \
                 and its children, statements from pg_stat_statements; everything on the same \
                 2 cores; median of {RUNS} runs, a fresh database each",
                THROUGHPUT_CONNS * THROUGHPUT_PER_CONN,
                n = setup.instances
            ),
        });
    }
    Ok(rows)
}

/// Delivery latency to a recipient on another instance against one on the same
/// instance, in alternating rounds on the same two instances.
async fn cross_instance(admin: &str) -> Result<Vec<Row>, String> {
    let url = webwaka_server_stub::testing::fresh_database(admin).await?;
    let _engine = Engine::set(&[(DATABASE_ENV, &url)]);
    let one = ChildProc::spawn(CHILD_SERVER)?;
    let two = ChildProc::spawn(CHILD_SERVER)?;
    let mut a = connect_user(one.addr, "same-a").await?;
    let mut b = connect_user(one.addr, "same-b").await?;
    let mut c = connect_user(one.addr, "cross-c").await?;
    let mut d = connect_user(two.addr, "cross-d").await?;
    let to = |recipient: &'static str, prefix: &'static str| {
        move |i: usize| {
            message_frame(
                &format!("{prefix}-{i}"),
                InteractionClass::ClassC,
                Some(recipient),
                None,
            )
        }
    };
    round_trips(&mut a, &mut b, to("same-b", "s"), 0, WARMUP, true).await?;
    round_trips(&mut c, &mut d, to("cross-d", "x"), 0, WARMUP, true).await?;
    let per_round = ROUND_TRIPS / ROUNDS;
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let first = WARMUP + round * per_round;
        same.extend(round_trips(&mut a, &mut b, to("same-b", "s"), first, per_round, true).await?);
        cross
            .extend(round_trips(&mut c, &mut d, to("cross-d", "x"), first, per_round, true).await?);
    }
    drop((a, b, c, d));
    one.stop();
    two.stop();
    let (same, cross) = (sorted(same), sorted(cross));
    let (s50, s99) = (percentile(&same, 0.5), percentile(&same, 0.99));
    let (x50, x99) = (percentile(&cross, 0.5), percentile(&cross, 0.99));
    Ok(vec![Row {
        name: "server: cross-instance delivery, PostgreSQL".into(),
        figure: format!(
            "same instance p50 {s50:.0} µs, p99 {s99:.0} µs; across instances p50 {x50:.0} µs, \
             p99 {x99:.0} µs: +{:.2} ms p50, +{:.2} ms p99 (targets ≤ +2 / ≤ +10 ms)",
            (x50 - s50) / 1e3,
            (x99 - s99) / 1e3
        ),
        method: format!(
            "two instances on one PostgreSQL (synchronous_commit=on); {ROUND_TRIPS} CLASS_C \
             direct messages per path one at a time (after {WARMUP}), sender on instance 1, \
             recipient on instance 1 or 2; clock from the sender's write to the recipient's \
             read; {ROUNDS} rounds alternating the two paths"
        ),
    }])
}

/// Fan-out to 1,000 members spread over three instances on one PostgreSQL.
async fn fanout_spread(admin: &str) -> Result<Vec<Row>, String> {
    let url = webwaka_server_stub::testing::fresh_database(admin).await?;
    let _engine = Engine::set(&[(DATABASE_ENV, &url)]);
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(ChildProc::spawn(CHILD_SERVER)?);
    }
    let (p50, max, per_fanout_us) = fanout_on(servers).await?;
    Ok(vec![Row {
        name: "server: fan-out to 1,000 members over 3 instances, PostgreSQL".into(),
        figure: format!(
            "p50 {p50:.2} ms, max {max:.2} ms; the instances' CPU {:.1} ms per fan-out ({:.1} \
             µs per member)",
            per_fanout_us / 1e3,
            per_fanout_us / FANOUT_MEMBERS as f64
        ),
        method: format!(
            "{FANOUT_MEMBERS} WebSocket connections in one room, member i on instance i mod 3, \
             the sender on the first; one CLASS_C message at a time, {FANOUT_RUNS} runs; clock \
             from the sender's write to the last member's read (each instance hears of the \
             message from PostgreSQL and delivers to its own members)"
        ),
    }])
}

/// Polls/s of an instance on PostgreSQL: from the tail, and with the tail off.
async fn polls_pg() -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for from_tail in [true, false] {
        let (mut rates, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (rate, cpu) = poll_run(from_tail).await?;
            rates.push(rate);
            cpus.push(cpu);
        }
        let (rate, cpu) = (median(&mut rates), median(&mut cpus));
        rows.push(Row {
            name: format!(
                "server: polls/s, 50 keep-alive clients, PostgreSQL{}",
                if from_tail { "" } else { ", tail off" }
            ),
            figure: format!(
                "{} (runs {}–{}; {cpu:.1} µs server CPU per poll)",
                fmt_rate(rate),
                fmt_rate(rates[0]),
                fmt_rate(rates[RUNS - 1])
            ),
            method: format!(
                "as the SQLite rows ({POLL_CLIENTS} clients, one event per poll), one instance \
                 on PostgreSQL{}; median of {RUNS} runs",
                if from_tail {
                    ": the page from the tail in memory"
                } else {
                    " with EVENT_BUS_TAIL_BYTES=0: every cursor and page read from PostgreSQL"
                }
            ),
        });
    }
    Ok(rows)
}
