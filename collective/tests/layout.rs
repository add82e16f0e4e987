//! The dp x tp layout: group membership, proved by sums over each group.

mod common;

use std::time::Duration;

use samtrain_collective::{Layout, ProcessGroups};
use tch::Tensor;

#[test]
fn layout_follows_rank_order() {
    let l = Layout::new(8, 4, 6).unwrap();
    assert_eq!((l.dp, l.dp_rank, l.tp_rank), (2, 1, 2));
    assert_eq!(l.tp_group(), vec![4, 5, 6, 7]);
    assert_eq!(l.dp_group(), vec![2, 6]);
    assert!(Layout::new(6, 4, 0).is_err());
    assert!(Layout::new(4, 2, 4).is_err());
}

/// Each rank contributes its own hex digit, so a sum lists its members:
/// (group rank, group size, sum) for the tp, dp and world groups.
type GroupSums = ((i64, i64, i64), (i64, i64, i64), (i64, i64, i64));

fn group_sums(groups: Vec<ProcessGroups>) -> Vec<GroupSums> {
    common::on_all(groups, |rank, g| {
        let x = Tensor::from(1i64 << (4 * rank));
        let sum = |c: &std::sync::Arc<dyn samtrain_comm::Collective>| {
            c.all_reduce_sum(&x).unwrap().int64_value(&[])
        };
        assert_eq!(g.layout.rank, rank as i64);
        (
            (g.tp.rank(), g.tp.world_size(), sum(&g.tp)),
            (g.dp.rank(), g.dp.world_size(), sum(&g.dp)),
            (g.world.rank(), g.world.world_size(), sum(&g.world)),
        )
    })
}

const WORLD_FOUR_TP_TWO: [GroupSums; 4] = [
    ((0, 2, 0x11), (0, 2, 0x101), (0, 4, 0x1111)),
    ((1, 2, 0x11), (0, 2, 0x1010), (1, 4, 0x1111)),
    ((0, 2, 0x1100), (1, 2, 0x101), (2, 4, 0x1111)),
    ((1, 2, 0x1100), (1, 2, 0x1010), (3, 4, 0x1111)),
];

#[test]
fn world_four_tp_two_forms_the_right_groups() {
    let groups = common::connect(4, 2, Duration::from_secs(20));
    assert_eq!(group_sums(groups), WORLD_FOUR_TP_TWO);
}

/// The threads-of-one-process world that tests and one-process runs use
/// has the same groups as the connected one.
#[test]
fn in_process_groups_match_the_connected_ones() {
    let groups = ProcessGroups::in_process(4, 2).unwrap();
    let layouts: Vec<Layout> = groups.iter().map(|g| g.layout).collect();
    let expected: Vec<Layout> = (0..4).map(|r| Layout::new(4, 2, r).unwrap()).collect();
    assert_eq!(layouts, expected);
    assert_eq!(group_sums(groups), WORLD_FOUR_TP_TWO);
    assert!(ProcessGroups::in_process(6, 4).is_err());
}
