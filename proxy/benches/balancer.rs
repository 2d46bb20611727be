//! The balancer's pick (power of two choices over peak-EWMA) with 3, 100 and 1,000 endpoints:
//! the cost must not grow with the number of endpoints. `cargo bench -p outrider-proxy --bench
//! balancer --features test-util`.

// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use outrider_proxy::test_util::PickBench;

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("balancer_pick");
    for n in [3u32, 100, 1_000] {
        let set = PickBench::new(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter(|| std::hint::black_box(set.pick()))
        });
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
