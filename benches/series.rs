//! History benchmarks: bytes on disk per point of the series codec, against Gorilla's
//! XOR coding of the same points in the same run.
//!
//! `cargo bench --bench series`. Series of 1 Hz points, one day each
//! (`TWINFLEET_BENCH_POINTS`, default 86,400), in chunks of `TWINFLEET_BENCH_CHUNK`
//! points (default 7,200: two hours at 1 Hz, the store's head size); bytes include each
//! chunk's header (first timestamp and value in full).

mod common;

use common::{Arma, cores, env_or};
use twinfleet_models::series::codec::ChunkEncoder;

fn row(bench: &str, value: &str, extra: &str) {
    println!("| {bench} | {} | {value} | {extra} |", cores());
}

/// Bits per point of `points` coded in chunks of `chunk`, by `new` (decimal or XOR).
fn bits_per_point(points: &[(i64, f64)], chunk: usize, new: fn(i64, f64) -> ChunkEncoder) -> f64 {
    let mut bits = 0u64;
    for c in points.chunks(chunk) {
        let mut e = new(c[0].0, c[0].1);
        for &(t, v) in &c[1..] {
            e.push(t, v);
        }
        bits += e.bits() + 32; // + the chunk's point count, as the store keeps it
    }
    bits as f64 / points.len() as f64
}

fn main() {
    let n = env_or("TWINFLEET_BENCH_POINTS", 86_400) as i64;
    let chunk = env_or("TWINFLEET_BENCH_CHUNK", 7_200) as usize;
    let start = 1_764_547_200_000i64; // 2025-12-01T00:00:00Z
    let series =
        |f: &mut dyn FnMut(i64) -> f64| -> Vec<(i64, f64)> { (0..n).map(|i| (start + i * 1_000, f(i))).collect() };
    println!("| benchmark | cores | bytes/point | detail |");
    println!("|---|---|---|---|");
    let cases: Vec<(&str, Vec<(i64, f64)>)> = vec![
        ("ARMA(4,3) humidity, sigma 0.05, 2 decimals", {
            let mut a = Arma::new(1, 45.0, 0.05);
            series(&mut |_| a.next_value())
        }),
        ("ARMA(4,3) temperature, sigma 0.2, 2 decimals", {
            let mut a = Arma::new(2, 21.0, 0.2);
            series(&mut |_| a.next_value())
        }),
        ("constant value", series(&mut |_| 21.5)),
        ("counter (+1 per point)", series(&mut |i| i as f64)),
        ("ARMA(4,3), full-precision floats (no rounding)", {
            let mut a = Arma::new(3, 45.0, 0.05);
            let mut prev = 0.0;
            series(&mut |_| {
                prev = a.next_value() + prev * 1e-9 + 1.0 / 3.0;
                prev
            })
        }),
    ];
    for (name, points) in &cases {
        let ours = bits_per_point(points, chunk, ChunkEncoder::new) / 8.0;
        let gorilla = bits_per_point(points, chunk, ChunkEncoder::new_xor) / 8.0;
        row(
            &format!("codec: {name}, 1 Hz"),
            &format!("{ours:.3}"),
            &format!("Gorilla XOR in the same run: {gorilla:.3} B/point; {n} points, chunks of {chunk}"),
        );
    }
}
