//! **hold**: `--concurrency` workers each send `POST /api/bookings/start`
//! of two seats nobody else asks for, one request at a time, for `--warmup` +
//! `--seconds` seconds (only the latter is measured), so every start succeeds
//! and the run measures the hold transaction itself. Positions come from one
//! counter over enough fresh 100x100 schedules (5,000 two-seat holds each);
//! 5,000 guest users are reused once per schedule (one pending hold per user
//! and schedule, so every start is the user's first on that schedule). Then
//! `deploy/bench/hold.pgbench` runs the same statements with pgbench (see
//! `pgbench`) on fresh schedules of the same database, while the replicas
//! keep running (their listener receives the NOTIFYs in both runs).
//! `--rounds N` repeats the pair, alternating which side goes first, and
//! reports means.
//!
//! So that both sides see the same database, and one that behaves like a
//! production one:
//! - before the runs the database gets a past (`--prefill`, default: 120
//!   sold-out schedules) and is analyzed: on empty tables the planner
//!   estimates a new schedule's seat rows at ~0 and reads every held seat of
//!   the schedule on each hold;
//! - ANALYZE runs before every run: it refreshes statistics and invalidates
//!   the plans the replicas' pooled connections cached earlier (a plan made
//!   while `schedules` was two pages seq-scans it once the counter updates
//!   have bloated it);
//! - each run is checked in the tables (one booking, two seat rows, one event
//!   per success), then its holds are marked CONFIRMED, so the next run does
//!   not start with thousands of pending holds;
//! - the replicas sweep once a minute (`SWEEP_INTERVAL_MS=60000`; nothing
//!   expires during a run, and a sweep scans all pending holds); sweeps that
//!   do run show up as `sweeper` in the backend profile.
//!
//! Reported per run: throughput, latency percentiles, errors (any non-201),
//! CPU per transaction of the load generator (this process, or pgbench), the
//! replica process(es) and the PostgreSQL backends of the bench database,
//! and what those backends were doing (sampled `pg_stat_activity`: CPU, lock
//! waits, idle in transaction waiting for the client, ...).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cpu::CpuProbe;
use crate::env::{create_schedules, guest_tokens, pg_connect, pg_error, BenchEnv};
use crate::http::HttpConn;
use crate::pgbench::pgbench_run;
use crate::report::{print_table, RunResult};
use crate::{HoldArgs, Prefill, Result};

pub(crate) const ROWS: i64 = 100;
pub(crate) const COLS: i64 = 100;
pub(crate) const PAIRS_PER_ROW: i64 = COLS / 2;
/// Two-seat holds that fit in one schedule.
pub(crate) const PAIRS: i64 = ROWS * PAIRS_PER_ROW;
/// Long enough that no hold expires (and no sweeper work starts) during a run.
pub(crate) const HOLD_SECONDS: u32 = 900;
/// Seat pair `p` (0-based) of a schedule: row `1 + p / 50`, columns `c, c + 1`.
pub(crate) fn pair_seats(p: i64) -> (i64, i64) {
    (1 + p / PAIRS_PER_ROW, 1 + 2 * (p % PAIRS_PER_ROW))
}

pub(crate) fn start_request(host: &SocketAddr, token: &str, schedule: i64, p: i64) -> Vec<u8> {
    let (row, col) = pair_seats(p);
    let body = format!(
        r#"{{"scheduleId":{schedule},"seats":[{{"row":{row},"col":{col}}},{{"row":{row},"col":{}}}]}}"#,
        col + 1
    );
    format!(
        "POST /api/bookings/start HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[derive(Default)]
pub(crate) struct HoldStats {
    /// 201s of measured requests.
    pub(crate) ok: u64,
    /// 201s during the warm-up.
    pub(crate) warmup_ok: u64,
    pub(crate) latencies_us: Vec<u64>,
    pub(crate) errors: u64,
    pub(crate) error_kinds: HashMap<String, u64>,
    pub(crate) error_samples: Vec<String>,
    /// Last completion of a measured request.
    pub(crate) last_done: Option<Instant>,
    pub(crate) exhausted: bool,
}

impl HoldStats {
    pub(crate) fn merge(&mut self, other: HoldStats) {
        self.ok += other.ok;
        self.warmup_ok += other.warmup_ok;
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        for (k, v) in other.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
        for s in other.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(s);
            }
        }
        self.last_done = self.last_done.max(other.last_done);
        self.exhausted |= other.exhausted;
    }

    pub(crate) fn error(&mut self, kind: String, sample: String) {
        self.errors += 1;
        *self.error_kinds.entry(kind).or_default() += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(sample);
        }
    }
}

pub(crate) async fn hold_mode(
    args: &HoldArgs,
    env: &BenchEnv,
    http: &reqwest::Client,
) -> Result<()> {
    if args.skip_service && args.skip_pgbench {
        return Err("--skip-service and --skip-pgbench leave nothing to run".into());
    }
    match args.prefill {
        Prefill::None => {}
        Prefill::Young => prefill(env, 1, PAIRS).await?,
        Prefill::Mature => prefill(env, 120, 50).await?,
    }
    let bases: Vec<String> = env.replicas.iter().map(|r| r.base.clone()).collect();
    let run_secs = args.seconds + args.warmup;
    let per_run = (args.max_rate * run_secs).div_ceil(PAIRS as u64).max(1) as usize;
    let t = Instant::now();
    let mut plan = Vec::new();
    for _ in 0..args.rounds {
        let base = &bases[0];
        let schedules = |skip: bool| async move {
            if skip {
                Ok(Vec::new())
            } else {
                create_schedules(http, base, &env.admin_token, per_run).await
            }
        };
        let service = schedules(args.skip_service).await?;
        let pgbench = schedules(args.skip_pgbench).await?;
        plan.push((service, pgbench));
    }
    let tokens = if args.skip_service {
        Vec::new()
    } else {
        guest_tokens(http, &bases, PAIRS as usize).await?
    };
    let tokens = Arc::new(tokens);
    println!(
        "bench: setup {:.1} s: {} round(s) of {} + {} schedules of {ROWS}x{COLS} \
         ({PAIRS} two-seat holds each), {} guest tokens",
        t.elapsed().as_secs_f64(),
        args.rounds,
        plan[0].0.len(),
        plan[0].1.len(),
        tokens.len()
    );

    let client = pg_connect(&env.db_url).await?;
    let mut service_results = Vec::new();
    let mut pgbench_results = Vec::new();
    let mut errors = 0;
    for (round, (service_schedules, pgbench_schedules)) in plan.iter().enumerate() {
        // Every other round runs pgbench first, so drift in the machine's
        // load does not always favour the same side.
        let pgbench_first = round % 2 == 1;
        for pgbench_turn in [pgbench_first, !pgbench_first] {
            // Fresh statistics before every run, which also invalidates the
            // plans cached by the replicas' pooled connections: a plan made
            // while `schedules` had 2 pages seq-scans it once the counter
            // updates have bloated it, until autovacuum gets to analyze it.
            // Both sides start from plans that fit the current tables.
            client.batch_execute("ANALYZE").await?;
            if pgbench_turn && !args.skip_pgbench {
                let (result, processed) = pgbench_run(args, env, pgbench_schedules).await?;
                // The tables must show exactly what the run reported.
                verify(&client, "pgbench", pgbench_schedules, processed).await?;
                settle(&client, pgbench_schedules).await?;
                pgbench_results.push(result);
            }
            if !pgbench_turn && !args.skip_service {
                let (result, stats) =
                    service_run(args, env, service_schedules, tokens.clone()).await?;
                verify(
                    &client,
                    "service",
                    service_schedules,
                    stats.ok + stats.warmup_ok,
                )
                .await?;
                settle(&client, service_schedules).await?;
                if stats.errors > 0 {
                    let mut kinds: Vec<_> = stats.error_kinds.iter().collect();
                    kinds.sort();
                    println!("bench: service errors: {kinds:?}");
                    for s in &stats.error_samples {
                        println!("  e.g. {s}");
                    }
                }
                if stats.exhausted {
                    println!(
                        "bench: warning: the service run used up its {} schedules; raise --max-rate",
                        service_schedules.len()
                    );
                }
                errors += stats.errors;
                service_results.push(result);
            }
        }
    }

    println!();
    let mut rows: Vec<&RunResult> = Vec::new();
    for i in 0..args.rounds as usize {
        rows.extend(service_results.get(i));
        if args.rounds > 1 {
            rows.extend(pgbench_results.get(i));
        }
    }
    if args.rounds == 1 {
        rows.extend(pgbench_results.first());
    }
    print_table(&rows);
    let mean = |rs: &[RunResult]| rs.iter().map(|r| r.rate).sum::<f64>() / rs.len().max(1) as f64;
    let service_rate = mean(&service_results);
    let pgbench_rate = mean(&pgbench_results);
    match (service_results.is_empty(), pgbench_results.is_empty()) {
        (false, false) => {
            let ratio = service_rate / pgbench_rate;
            if args.rounds > 1 {
                let per_round: Vec<String> = service_results
                    .iter()
                    .zip(&pgbench_results)
                    .map(|(s, p)| format!("{:.3}", s.rate / p.rate))
                    .collect();
                println!(
                    "per-round ratios {}; below: means over {} rounds",
                    per_round.join(", "),
                    args.rounds
                );
            }
            println!(
                "ratio service/pgbench = {ratio:.3} (target >= 0.9: {})",
                if ratio >= 0.9 { "met" } else { "NOT met" }
            );
            println!(
                "bench: service {service_rate:.1} holds/s, pgbench {pgbench_rate:.1} tps, ratio {ratio:.3}"
            );
        }
        (false, true) => println!("bench: service {service_rate:.1} holds/s, pgbench skipped"),
        _ => println!("bench: service skipped, pgbench {pgbench_rate:.1} tps"),
    }
    if errors > 0 {
        return Err(format!("{errors} service requests did not answer 201").into());
    }
    Ok(())
}

/// Gives the database a past before anything is prepared: `schedules`
/// sold-out schedules of `pairs` confirmed two-seat bookings each (with their
/// seats and events), which neither run touches; then ANALYZE. Whether the
/// planner can estimate a new schedule's seat rows depends on it (see
/// `--prefill`).
pub(crate) async fn prefill(env: &BenchEnv, schedules: i32, pairs: i64) -> Result<()> {
    let t = Instant::now();
    let db = pg_connect(&env.db_url).await?;
    let ids: Vec<i64> = db
        .query(
            "INSERT INTO schedules (title, starts_at, rows, cols) \
             SELECT 'bench past ' || g, now() - interval '1 day', $2, $3 \
             FROM generate_series(1, $1) g RETURNING id",
            &[&schedules, &(ROWS as i32), &(COLS as i32)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (per_row, pairs) = (PAIRS_PER_ROW as i32, pairs as i32);
    let steps: [(&str, &[&(dyn tokio_postgres::types::ToSql + Sync)]); 4] = [
        (
            "INSERT INTO bookings (id, schedule_id, user_id, status, seats, expires_at, request_fingerprint) \
             SELECT gen_random_uuid(), s, gen_random_uuid(), 'CONFIRMED', \
                    jsonb_build_array(jsonb_build_object('row', 1 + p / $2, 'col', 1 + 2 * (p % $2)), \
                                      jsonb_build_object('row', 1 + p / $2, 'col', 2 + 2 * (p % $2))), \
                    now(), '' \
             FROM unnest($1::bigint[]) s, generate_series(0, $3 - 1) p",
            &[&ids, &per_row, &pairs],
        ),
        (
            "INSERT INTO schedule_seat_status (schedule_id, row_num, col_num, booking_id, status, expires_at) \
             SELECT b.schedule_id, (s->>'row')::int2, (s->>'col')::int2, b.id, 'CONFIRMED', NULL \
             FROM bookings b, jsonb_array_elements(b.seats) s WHERE b.schedule_id = ANY($1)",
            &[&ids],
        ),
        (
            "INSERT INTO seat_events (schedule_id, event_id, action, seats) \
             SELECT schedule_id, row_number() OVER (PARTITION BY schedule_id), 'CONFIRMED', seats \
             FROM bookings WHERE schedule_id = ANY($1)",
            &[&ids],
        ),
        (
            "UPDATE schedule_event_counters SET last_event_id = $2 WHERE schedule_id = ANY($1)",
            &[&ids, &i64::from(pairs)],
        ),
    ];
    for (sql, params) in steps {
        db.execute(sql, params)
            .await
            .map_err(|e| format!("prefill: {}", pg_error(&e)))?;
    }
    db.batch_execute("ANALYZE").await?;
    println!(
        "bench: prefill {:.1} s: {schedules} past sold-out schedule(s) of {} seats, ANALYZE",
        t.elapsed().as_secs_f64(),
        2 * pairs
    );
    Ok(())
}

/// Marks a verified run's holds as paid, so the next run starts without
/// thousands of pending holds (which the sweeper scans).
pub(crate) async fn settle(client: &tokio_postgres::Client, schedules: &[i64]) -> Result<()> {
    client
        .execute(
            "UPDATE bookings SET status = 'CONFIRMED', updated_at = now() \
             WHERE schedule_id = ANY($1) AND status = 'PENDING'",
            &[&schedules],
        )
        .await?;
    client
        .execute(
            "UPDATE schedule_seat_status SET status = 'CONFIRMED', expires_at = NULL \
             WHERE schedule_id = ANY($1)",
            &[&schedules],
        )
        .await?;
    Ok(())
}

pub(crate) async fn service_run(
    args: &HoldArgs,
    env: &BenchEnv,
    schedules: &[i64],
    tokens: Arc<Vec<String>>,
) -> Result<(RunResult, HoldStats)> {
    let next = Arc::new(AtomicU64::new(0));
    let capacity = schedules.len() as u64 * PAIRS as u64;
    let schedules: Arc<Vec<i64>> = Arc::new(schedules.to_vec());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.seconds);
    println!(
        "bench: service run: {} workers, POST /api/bookings/start of 2 free seats, {} s warm-up + {} s",
        args.concurrency, args.warmup, args.seconds
    );
    let mut workers = Vec::new();
    for w in 0..args.concurrency as usize {
        let addr = env.replicas[w % env.replicas.len()].addr;
        let next = next.clone();
        let schedules = schedules.clone();
        let tokens = tokens.clone();
        workers.push(tokio::spawn(async move {
            let mut stats = HoldStats::default();
            let mut conn = HttpConn::new(addr);
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= capacity {
                    stats.exhausted = true;
                    break;
                }
                let n = n as i64;
                let schedule = schedules[(n / PAIRS) as usize];
                let p = n % PAIRS;
                let req = start_request(&addr, &tokens[p as usize], schedule, p);
                let started = Instant::now();
                let res = conn.send(&req).await;
                let done = Instant::now();
                let measured = started >= measure_from;
                match res {
                    Ok((201, _)) if measured => {
                        stats.ok += 1;
                        stats.latencies_us.push((done - started).as_micros() as u64);
                        stats.last_done = Some(done);
                    }
                    Ok((201, _)) => stats.warmup_ok += 1,
                    Ok((status, body)) => stats.error(
                        format!("HTTP {status}"),
                        format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                    ),
                    Err(e) => stats.error(format!("io {:?}", e.kind()), format!("io: {e}")),
                }
            }
            stats
        }));
    }
    // CPU is accounted over the measured window only.
    tokio::time::sleep_until(measure_from.into()).await;
    let probe = CpuProbe::begin(env).await?;
    let mut stats = HoldStats::default();
    for w in workers {
        stats.merge(w.await?);
    }
    let cpu = probe.finish().await;
    let elapsed = stats
        .last_done
        .map(|d| d.duration_since(measure_from))
        .unwrap_or(Duration::from_secs(args.seconds))
        .max(Duration::from_millis(1));
    let rate = stats.ok as f64 / elapsed.as_secs_f64();
    let result = RunResult {
        name: format!("service {}x{}", env.replicas.len(), args.concurrency),
        rate,
        latencies_us: std::mem::take(&mut stats.latencies_us),
        errors: stats.errors,
        transactions: stats.ok,
        cpu,
    };
    println!(
        "bench: service run done: {} holds in {:.2} s, {} errors",
        stats.ok,
        elapsed.as_secs_f64(),
        stats.errors
    );
    Ok((result, stats))
}

/// Checks in the tables that `expected` holds committed on `schedules`, each
/// with one booking and two seat rows, and no seat twice.
pub(crate) async fn verify(
    client: &tokio_postgres::Client,
    what: &str,
    schedules: &[i64],
    expected: u64,
) -> Result<()> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM bookings WHERE schedule_id = ANY($1) AND status = 'PENDING'), \
                    (SELECT count(*) FROM schedule_seat_status WHERE schedule_id = ANY($1)), \
                    (SELECT count(*) FROM seat_events WHERE schedule_id = ANY($1))",
            &[&schedules],
        )
        .await?;
    let (bookings, seats, events): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let ok =
        bookings as u64 == expected && seats as u64 == 2 * expected && events as u64 == expected;
    println!(
        "bench: {what} check: {bookings} bookings, {seats} seat rows, {events} events for {expected} holds: {}",
        if ok { "ok" } else { "MISMATCH" }
    );
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: the tables do not match the run").into())
    }
}
