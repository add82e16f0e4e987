//! Results of every operation against a plain computation in one process,
//! for several world sizes, tensor sizes and dtypes, over real TCP.

mod common;

use std::time::Duration;

use samtrain_collective::{Abort, RingCollective};
use samtrain_comm::Collective;
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Rank `rank`'s input: distinct per rank and position, deterministic.
/// Integer kinds get integers; floats get non-integers so the order of
/// summation shows in the last bits.
fn input(rank: usize, numel: i64, kind: Kind) -> Tensor {
    let i = Tensor::arange(numel, (Kind::Double, tch::Device::Cpu));
    let v = match kind {
        Kind::Int64 | Kind::Int => &i * (rank as f64 + 1.0) - 50.0,
        _ => {
            ((&i * (0.37 * (rank as f64 + 1.0))).sin() * 100.0).round() / 8.0
                + (&i * 1e-3 + rank as f64).sqrt()
        }
    };
    v.to_kind(kind)
}

/// Sizes around the edges: empty, fewer elements than ranks, not divisible
/// by the world size, and several pipeline pieces per chunk.
const SIZES: [i64; 6] = [0, 1, 3, 7, 1001, 400_003];

/// The raw bytes of a tensor, to compare results bit for bit (`equal`
/// would take -0.0 for 0.0).
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn check_all_reduce(world: usize, kind: Kind, tolerance: f64) {
    let groups = common::connect(world, 1, TIMEOUT);
    let results = common::on_all(groups, move |rank, g| {
        SIZES
            .iter()
            .map(|&n| {
                let x = input(rank, n, kind);
                let first = g.world.all_reduce_sum(&x).unwrap();
                assert_eq!(bytes(&x), bytes(&input(rank, n, kind)), "input untouched");
                let again = g.world.all_reduce_sum(&x).unwrap();
                assert!(first.equal(&again), "same inputs, same result");
                let mut inplace = x.copy();
                g.world.all_reduce_sum_(&mut inplace).unwrap();
                assert_eq!(bytes(&inplace), bytes(&first), "in place, the same bits");
                assert_eq!(first.kind(), kind);
                assert_eq!(first.size(), vec![n]);
                first
            })
            .collect::<Vec<_>>()
    });
    for (s, &n) in SIZES.iter().enumerate() {
        let expected = (0..world)
            .map(|r| input(r, n, kind).to_kind(Kind::Double))
            .fold(
                Tensor::zeros([n], (Kind::Double, tch::Device::Cpu)),
                |a, b| a + b,
            );
        for (rank, r) in results.iter().enumerate() {
            assert!(
                r[s].equal(&results[0][s]),
                "world {world} {kind:?} n {n}: rank {rank} differs from rank 0 in some bit"
            );
        }
        if n > 0 {
            let err = (results[0][s].to_kind(Kind::Double) - &expected)
                .abs()
                .max()
                .double_value(&[]);
            let scale = expected.abs().max().double_value(&[]).max(1.0);
            assert!(
                err <= tolerance * scale,
                "world {world} {kind:?} n {n}: error {err} against the local sum"
            );
        }
    }
}

#[test]
fn all_reduce_f32_matches_local_sum() {
    for world in 1..=4 {
        check_all_reduce(world, Kind::Float, 1e-6);
    }
}

/// Groups on one host all-reduce through shared memory, and get the very
/// bits the TCP ring gets, for every dtype and size, twice in a row (the
/// second call grows the slots).
#[test]
fn shared_memory_sums_the_bits_tcp_sums() {
    for world in [2, 3, 4] {
        let results: Vec<Vec<Vec<Vec<u8>>>> = [true, false]
            .into_iter()
            .map(|shared| {
                let groups =
                    common::connect_over(world, 1, TIMEOUT, |_| 1, |_| Abort::new(), shared)
                        .into_iter()
                        .map(|g| g.expect("connect"))
                        .collect();
                common::on_all(groups, move |rank, g| {
                    let want = if shared { "shared memory" } else { "tcp" };
                    assert_eq!(g.world.transport(), want);
                    let mut out = Vec::new();
                    for kind in [Kind::Float, Kind::BFloat16, Kind::Double, Kind::Int64] {
                        for numel in SIZES {
                            let mut t = input(rank, numel, kind);
                            g.world.all_reduce_sum_(&mut t).unwrap();
                            out.push(bytes(&t));
                        }
                    }
                    out
                })
            })
            .collect();
        assert_eq!(
            results[0], results[1],
            "world {world}: shared memory differs from tcp"
        );
    }
}

#[test]
fn all_reduce_exact_for_integers_and_f64() {
    for world in [2, 3, 4] {
        check_all_reduce(world, Kind::Int64, 0.0);
        check_all_reduce(world, Kind::Int, 0.0);
        check_all_reduce(world, Kind::Double, 1e-14);
    }
}

#[test]
fn all_reduce_half_types_sum_in_f32() {
    for world in [2, 3] {
        // One rounding to bf16 / f16 at the end.
        check_all_reduce(world, Kind::BFloat16, 1.0 / 128.0);
        check_all_reduce(world, Kind::Half, 1.0 / 1024.0);
    }
}

#[test]
fn in_place_sums_views_and_non_contiguous_tensors_in_their_own_memory() {
    let groups = common::connect(3, 1, TIMEOUT);
    common::on_all(groups, |rank, g| {
        for kind in [Kind::Float, Kind::Double, Kind::BFloat16] {
            let x = input(rank, 6 * 50_001, kind).view([6, 50_001]);
            // A row: contiguous, at an offset into a bigger storage, whose
            // other rows must stay as they were.
            let mut whole = x.copy();
            let mut row = whole.narrow(0, 2, 1);
            let expected = g.world.all_reduce_sum(&row).unwrap();
            let before = row.data_ptr();
            g.world.all_reduce_sum_(&mut row).unwrap();
            assert_eq!(row.data_ptr(), before, "{kind:?}: the same memory");
            assert_eq!(bytes(&row), bytes(&expected), "{kind:?}");
            assert_eq!(bytes(&whole.narrow(0, 3, 3)), bytes(&x.narrow(0, 3, 3)));
            // A transposed (non-contiguous) tensor is summed through a copy.
            let mut t = x.copy().transpose(0, 1);
            let expected = g.world.all_reduce_sum(&t).unwrap();
            g.world.all_reduce_sum_(&mut t).unwrap();
            assert!(!t.is_contiguous());
            assert_eq!(bytes(&t), bytes(&expected), "{kind:?}");
            // The whole tensor, in place.
            let expected = g.world.all_reduce_sum(&whole).unwrap();
            g.world.all_reduce_sum_(&mut whole).unwrap();
            assert_eq!(bytes(&whole), bytes(&expected), "{kind:?}");
        }
    });
}

#[test]
fn integer_valued_floats_sum_exactly() {
    let groups = common::connect(3, 1, TIMEOUT);
    let results = common::on_all(groups, |rank, g| {
        let x = Tensor::arange(100_000, (Kind::Float, tch::Device::Cpu)) * (rank as f64 + 1.0);
        let sum = g.world.all_reduce_sum(&x.view([100, 1000])).unwrap();
        Vec::<f32>::try_from(sum.flatten(0, -1)).unwrap()
    });
    let expected: Vec<f32> = (0..100_000).map(|i| 6.0 * i as f32).collect();
    for r in results {
        assert_eq!(r, expected);
    }
}

#[test]
fn all_gather_broadcast_and_barrier_match_local_values() {
    for world in 1..=4 {
        let groups = common::connect(world, 1, TIMEOUT);
        let results = common::on_all(groups, move |rank, g| {
            let mut out = Vec::new();
            for &n in &SIZES {
                for kind in [Kind::Float, Kind::Int64, Kind::BFloat16, Kind::Uint8] {
                    let x = input(rank, n, kind);
                    let gathered = g.world.all_gather(&x).unwrap();
                    assert_eq!(gathered.len(), world);
                    for (r, t) in gathered.iter().enumerate() {
                        assert!(
                            t.equal(&input(r, n, kind)),
                            "all_gather n {n} {kind:?} slot {r}"
                        );
                    }
                    for root in 0..world as i64 {
                        let b = g.world.broadcast(&x, root).unwrap();
                        assert!(
                            b.equal(&input(root as usize, n, kind)),
                            "broadcast n {n} {kind:?} root {root}"
                        );
                    }
                }
            }
            // A 2-D tensor keeps its shape.
            let m = Tensor::ones([3, 5], (Kind::Float, tch::Device::Cpu)) * rank as f64;
            let gathered = g.world.all_gather(&m).unwrap();
            for (r, t) in gathered.iter().enumerate() {
                assert_eq!(t.size(), vec![3, 5]);
                assert_eq!(t.double_value(&[2, 4]), r as f64);
            }
            g.world.barrier().unwrap();
            out.push(
                g.world
                    .all_reduce_sum(&Tensor::from(1i64))
                    .unwrap()
                    .int64_value(&[]),
            );
            out
        });
        for r in results {
            assert_eq!(r, vec![world as i64]);
        }
    }
}

#[test]
fn barrier_waits_for_the_last_rank() {
    let groups = common::connect(3, 1, TIMEOUT);
    let start = std::time::Instant::now();
    let waited = common::on_all(groups, move |rank, g| {
        if rank == 2 {
            std::thread::sleep(Duration::from_millis(300));
        }
        g.world.barrier().unwrap();
        start.elapsed()
    });
    for w in waited {
        assert!(
            w >= Duration::from_millis(300),
            "left the barrier after {w:?}"
        );
    }
}

#[test]
fn single_rank_group_needs_no_sockets() {
    let g = RingCollective::single("world");
    let x = Tensor::from_slice(&[1.5f32, -2.0]);
    assert!(g.all_reduce_sum(&x).unwrap().equal(&x));
    let mut y = x.copy();
    g.all_reduce_sum_(&mut y).unwrap();
    assert!(y.equal(&x));
    assert!(g.broadcast(&x, 0).unwrap().equal(&x));
    assert_eq!(g.all_gather(&x).unwrap().len(), 1);
    g.barrier().unwrap();
    let err = g.broadcast(&x, 1).unwrap_err().to_string();
    assert!(err.contains("root 1"), "{err}");
}
