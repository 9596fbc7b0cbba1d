//! Results: the hold table, percentiles, JSON files under `docs/bench/`, and
//! the SVG plot of drop latency against load (hand-written SVG).

use std::path::{Path, PathBuf};

use clap::Args;

use crate::cpu::{num_cpus, CpuReport};
use crate::Result;

/// One row of the result table.
pub(crate) struct RunResult {
    pub(crate) name: String,
    pub(crate) rate: f64,
    pub(crate) latencies_us: Vec<u64>,
    pub(crate) errors: u64,
    pub(crate) transactions: u64,
    pub(crate) cpu: CpuReport,
}

pub(crate) fn print_table(results: &[&RunResult]) {
    println!(
        "{:<26} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} | {:>25} | {:>6}",
        "run",
        "tx/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "CPU ms/tx: load  app   pg",
        "busy"
    );
    for r in results {
        let mut l = r.latencies_us.clone();
        l.sort_unstable();
        let ms = |q: f64| percentile(&l, q) as f64 / 1000.0;
        let per_tx = |ms: f64| {
            if r.transactions == 0 {
                0.0
            } else {
                ms / r.transactions as f64
            }
        };
        println!(
            "{:<26} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} | {:>14.3} {:>5.3} {:>5.3} | {:>5.0}%",
            r.name,
            r.rate,
            ms(0.50),
            ms(0.95),
            ms(0.99),
            ms(1.0),
            r.errors,
            per_tx(r.cpu.load_ms),
            per_tx(r.cpu.replica_ms),
            per_tx(r.cpu.postgres_ms),
            r.cpu.machine_busy * 100.0
        );
    }
    println!(
        "(CPU ms/tx: load = this process + pgbench, app = replica process(es), pg = backends of the bench \
         database; busy = whole machine, all {} cores, incl. other users)",
        num_cpus()
    );
    println!("bench database backends, mean number per state (sampled every 100 ms; idle ones left out):");
    for r in results {
        let polls = r.cpu.polls.max(1) as f64;
        let top: Vec<String> = r
            .cpu
            .waits
            .iter()
            .take(7)
            .map(|(k, n)| format!("{k} {:.1}", *n as f64 / polls))
            .collect();
        println!(
            "  {:<26} busy {:>5.1}: {}",
            r.name,
            r.cpu.busy_samples as f64 / polls,
            top.join(", ")
        );
    }
}

pub(crate) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(crate) fn percentile_i(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Writes one run's result as pretty JSON to `dir/name`.
pub(crate) fn write_result(dir: &Path, name: &str, value: &serde_json::Value) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(path)
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PlotArgs {
    /// Directory of the drop results (`drop-*.json`).
    #[arg(long, default_value = "docs/bench", value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// The SVG to write.
    #[arg(
        long,
        default_value = "docs/bench-drop-latency.svg",
        value_name = "PATH"
    )]
    pub(crate) out: PathBuf,
}

/// One drop run, as the plot needs it.
struct Point {
    mode: String,
    offered: f64,
    /// p50, p90, p99, max of the fan's first answer, from the click, in ms.
    ms: [f64; 4],
    sold_out: Option<f64>,
}

pub(crate) fn plot(args: &PlotArgs) -> Result<()> {
    let mut points = Vec::new();
    for entry in std::fs::read_dir(&args.dir)
        .map_err(|e| format!("{}: {e}", args.dir.display()))?
        .flatten()
    {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("drop-") && name.ends_with(".json")) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let l = &v["firstAnswerFromClickMs"];
        let q = |k: &str| l[k].as_f64().unwrap_or(0.0).max(0.1);
        points.push(Point {
            mode: v["mode"].as_str().unwrap_or("?").to_owned(),
            offered: v["offeredFansPerSecond"].as_f64().unwrap_or(0.0),
            ms: [q("p50"), q("p90"), q("p99"), q("max")],
            sold_out: v["soldOutSeconds"].as_f64(),
        });
    }
    if points.is_empty() {
        return Err(format!("no drop-*.json in {}", args.dir.display()).into());
    }
    points.sort_by(|a, b| a.mode.cmp(&b.mode).then(a.offered.total_cmp(&b.offered)));
    let svg = latency_svg(&points);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, svg)?;
    println!(
        "bench: plotted {} drop run(s) into {}",
        points.len(),
        args.out.display()
    );
    Ok(())
}

/// Latency percentiles (log scale) against offered fans per second (log
/// scale): one colour per percentile, solid for picked seats, dashed for
/// best available.
fn latency_svg(points: &[Point]) -> String {
    use std::fmt::Write as _;
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 190.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let (x0, x1) = nice_range(
        points.iter().map(|p| p.offered).fold(f64::MAX, f64::min),
        points.iter().map(|p| p.offered).fold(0.0, f64::max),
    );
    let (y0, y1) = nice_range(
        points.iter().map(|p| p.ms[0]).fold(f64::MAX, f64::min),
        points.iter().map(|p| p.ms[3]).fold(0.0, f64::max),
    );
    let x = |v: f64| left + (v.log10() - x0) / (x1 - x0) * pw;
    let y = |v: f64| top + ph - (v.log10() - y0) / (y1 - y0) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<title>seatsync ticket drop: answer latency against load</title>
<rect width="{w}" height="{h}" fill="#fff"/>
<text x="{left}" y="20" font-size="14" font-weight="bold">Ticket drop: latency of the first answer, from the click</text>
<text x="{left}" y="34" fill="#555">one run per point; PostgreSQL, replicas and load generator share one machine</text>
"##
    );
    // Grid lines at 1, 2, 5 per decade.
    for v in ticks(x0, x1) {
        let px = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 16.0,
            human(v)
        );
    }
    for v in ticks(y0, y1) {
        let py = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            human(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">offered load: fans clicking per second (log)</text>
<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">ms from the click (log)</text>"##,
        left + pw / 2.0,
        h - 14.0,
        top + ph / 2.0
    );
    let colours = ["#1b9e77", "#7570b3", "#d95f02", "#e7298a"];
    let names = ["p50", "p90", "p99", "max"];
    let mut modes: Vec<&str> = points.iter().map(|p| p.mode.as_str()).collect();
    modes.dedup();
    for (mi, mode) in modes.iter().enumerate() {
        let run: Vec<&Point> = points.iter().filter(|p| p.mode == *mode).collect();
        let dash = if *mode == "best-available" {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        for (k, colour) in colours.iter().enumerate() {
            let path: Vec<String> = run
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.offered), y(p.ms[k])))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"##,
                path.join(" ")
            );
            for p in &run {
                let _ = writeln!(
                    s,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{mode}, {} fans/s: {} {:.0} ms; sold out {}</title></circle>"##,
                    x(p.offered),
                    y(p.ms[k]),
                    human(p.offered),
                    names[k],
                    p.ms[k],
                    p.sold_out
                        .map_or("never".to_owned(), |t| format!("after {t:.2} s"))
                );
            }
        }
        let ly = top + 10.0 + mi as f64 * 22.0;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="#444" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{mode}</text>"##,
            lx + 30.0,
            lx + 36.0,
            ly + 4.0
        );
    }
    for (k, colour) in colours.iter().enumerate() {
        let ly = top + 70.0 + k as f64 * 20.0;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r##"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            ly - 6.0,
            lx + 18.0,
            ly + 4.0,
            names[k]
        );
    }
    s.push_str("</svg>\n");
    s
}

/// log10 of the 1-2-5 steps just below `lo` and just above `hi`.
fn nice_range(lo: f64, hi: f64) -> (f64, f64) {
    let steps = |e: f64| [1.0, 2.0, 5.0].map(|m| m * 10f64.powf(e));
    let below = steps(lo.log10().floor())
        .into_iter()
        .rfind(|&v| v <= lo)
        .unwrap_or(lo);
    let above = (0..2)
        .flat_map(|d| steps(hi.log10().floor() + f64::from(d)))
        .find(|&v| v >= hi)
        .unwrap_or(hi);
    (below.log10(), above.log10().max(below.log10() + 0.3))
}

/// The 1-2-5 steps between two log10 bounds.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut e = lo.floor();
    while e <= hi.ceil() {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powf(e);
            if v.log10() >= lo - 1e-9 && v.log10() <= hi + 1e-9 {
                out.push(v);
            }
        }
        e += 1.0;
    }
    out
}

fn human(v: f64) -> String {
    if v >= 1000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}k", v / 1000.0)
    } else {
        format!("{v}")
    }
}
