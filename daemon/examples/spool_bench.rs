//! The spool log on its own (`store::log`, issue #17): N tasks each append a 1.6 KB event and wait until
//! it is durable, again and again, through the spool thread (`store::log::spool`), on the real disk.
//! Prints, per preallocation and sync mode, appends/s, commits (one write and one sync each)/s, the mean
//! batch, latency p50/p99, the write and sync syscalls per event, and disk bytes per event.
//!
//! `cargo run --release -p hookbridge --example spool_bench -- [TASKS] [SECONDS] [DIR] [MODES]`
//! (defaults 64, 5, `target/spool-bench`, all six `grow|zero|fallocate` x `fdatasync|dsync`, e.g.
//! `zero/dsync,grow/fdatasync`). DIR must be on the disk the spool would use (not tmpfs).

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookbridge::event::Event;
use hookbridge::store::Dedup;
use hookbridge::store::log::file::{OsDisk, Prealloc, SyncMode};
use hookbridge::store::log::spool::Spool;
use hookbridge::store::log::{Log, Options};

fn event(n: u64, body: &Bytes) -> Event {
    Event {
        id: format!("0190f1d2-{n:04x}-7000-8000-000000000000"),
        source: "clockify".into(),
        event_type: "NEW_TIME_ENTRY".into(),
        received_at_ms: 1_764_633_600_000,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("clockify-webhook-event-type".into(), "NEW_TIME_ENTRY".into()),
            ("user-agent".into(), "Clockify-Webhook/1.0".into()),
        ],
        body: body.clone(),
        dedup_key: "clockify:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        ordering_key: Some("clockify:64c777ddd3fcab07cfbb210c".into()),
        body_is_json: true,
    }
}

fn parse_mode(m: &str) -> (Prealloc, SyncMode) {
    let (p, s) = m.split_once('/').expect("MODE is prealloc/sync");
    let p = match p {
        "grow" => Prealloc::Grow,
        "zero" => Prealloc::ZeroFill,
        "fallocate" => Prealloc::Fallocate,
        _ => panic!("prealloc: grow, zero or fallocate"),
    };
    let s = match s {
        "fdatasync" => SyncMode::Fdatasync,
        "dsync" => SyncMode::Dsync,
        _ => panic!("sync: fdatasync or dsync"),
    };
    (p, s)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tasks: usize = args.first().map_or(64, |a| a.parse().expect("TASKS"));
    let seconds: u64 = args.get(1).map_or(5, |a| a.parse().expect("SECONDS"));
    let root = PathBuf::from(args.get(2).map_or("target/spool-bench", String::as_str));
    let modes = args.get(3).map_or(
        "grow/fdatasync,grow/dsync,zero/fdatasync,zero/dsync,fallocate/fdatasync,fallocate/dsync",
        String::as_str,
    );
    // A 1.4 KB body, the size of the captured Clockify NEW_TIME_ENTRY (about 1.6 KB framed).
    let body = Bytes::from(format!("{{\"id\":\"64c777ddd3fcab07cfbb210c\",\"pad\":\"{}\"}}", "x".repeat(1360)));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // The spool thread answers through a task on this runtime, as in the daemon.
    let _enter = rt.enter();
    println!("tasks {tasks}, {seconds} s per mode, body {} B, dir {}", body.len(), root.display());
    println!();
    println!("| mode | appends/s | commits/s | events/commit | p50 µs | p99 µs | syscalls/event | disk B/event |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for mode in modes.split(',') {
        let (prealloc, sync) = parse_mode(mode);
        let dir = root.join(mode.replace('/', "-"));
        let _ = std::fs::remove_dir_all(&dir);
        let options = Options { segment_size: 64 << 20, prealloc, sync, first_seq: 0 };
        let (log, _) = Log::open(OsDisk, &dir, *b"spool-bench-uuid", options).expect("open");
        let (spool, thread) = Spool::spawn(log, 4096, 1024).expect("spool thread");
        let stop = Arc::new(AtomicBool::new(false));
        let (events, commits, mut latencies, wall) = rt.block_on(async {
            // Warm-up: the first segment's pages, the runtime's threads.
            for n in 0..200 {
                spool.insert(event(n, &body), vec!["file".into()], Dedup::Off).await.expect("append");
            }
            let (e0, c0) =
                (spool.stats().events.load(Ordering::Relaxed), spool.stats().commits.load(Ordering::Relaxed));
            let started = Instant::now();
            let workers: Vec<_> = (0..tasks)
                .map(|t| {
                    let (a, stop, body) = (spool.clone(), Arc::clone(&stop), body.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        let mut n = t as u64;
                        while !stop.load(Ordering::Relaxed) {
                            let at = Instant::now();
                            a.insert(event(n, &body), vec!["file".into()], Dedup::Off).await.expect("append");
                            lat.push(at.elapsed());
                            n += tasks as u64;
                        }
                        lat
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.store(true, Ordering::Relaxed);
            let mut all = Vec::new();
            for w in workers {
                all.extend(w.await.expect("task"));
            }
            let wall = started.elapsed();
            let stats = spool.stats();
            (stats.events.load(Ordering::Relaxed) - e0, stats.commits.load(Ordering::Relaxed) - c0, all, wall)
        });
        drop(spool);
        let log = thread.join().expect("spool thread");
        drop(log);
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_micros();
        let bytes: u64 =
            std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry").metadata().expect("meta").len()).sum();
        let total_events = events + 200;
        // Per commit: pwrite + fdatasync, or one pwritev2.
        let per_commit = if sync == SyncMode::Fdatasync { 2.0 } else { 1.0 };
        let disk =
            if prealloc == Prealloc::Grow { format!("{}", bytes / total_events) } else { "(preallocated)".into() };
        println!(
            "| {mode} | {:.0} | {:.0} | {:.1} | {} | {} | {:.3} | {disk} |",
            events as f64 / wall.as_secs_f64(),
            commits as f64 / wall.as_secs_f64(),
            events as f64 / commits.max(1) as f64,
            pct(0.5),
            pct(0.99),
            per_commit * commits as f64 / events.max(1) as f64,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
