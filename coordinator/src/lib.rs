//! The control plane: the job state machine, the store (etcd or in-memory)
//! behind one trait, leases, leader election, rendezvous, the restart policy
//! and the gRPC server. It never depends on libtorch. It holds the
//! workspace's place until the control plane lands.
