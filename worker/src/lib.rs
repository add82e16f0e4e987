//! The worker: the training loop, optimizer and schedule, the collective
//! backends (TCP ring, NCCL) behind the model's `Collective` interface,
//! process groups, checkpoints, and the agent that talks to the coordinator.
//! It holds the workspace's place until the training loop lands.
