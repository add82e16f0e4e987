//! Joining one generation's process groups, as every launcher does it
//! (`samtrain train` with a fixed world, `samtrain worker` with the
//! coordinator's assignment): this rank, every rank's address, the job's
//! parallel settings, and the flag that ends the generation.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use samtrain_collective::{Abort, CollectiveError, GroupOptions, ProcessGroups};
use samtrain_proto::spec::JobSpec;

use crate::trainer::Groups;

/// Connects this rank to the world's data- and tensor-parallel groups over
/// the TCP ring; `listener` is bound to this rank's entry of `peers`.
/// Setting `ended` makes any wait (connecting included) fail promptly.
pub fn join_groups(
    rank: u32,
    peers: &[String],
    spec: &JobSpec,
    generation: u64,
    ended: Arc<AtomicBool>,
    listener: TcpListener,
) -> Result<Groups, CollectiveError> {
    let groups = ProcessGroups::connect(
        GroupOptions {
            rank: i64::from(rank),
            peers: peers.to_vec(),
            tp: i64::from(spec.parallel.tp),
            generation,
            timeout: Duration::from_secs_f64(spec.parallel.collective_timeout_s),
            abort: Abort::from(ended),
        },
        listener,
    )?;
    tracing::info!(layout = ?groups.layout, generation, "process groups connected");
    Ok(Groups {
        dp: groups.dp,
        tp: (spec.parallel.tp > 1).then_some(groups.tp),
    })
}
