//! samtrain's gRPC API: the `.proto` definitions and their generated code,
//! and nothing else. The services (jobs, workers, rendezvous) are defined
//! with the coordinator; until then this crate only holds the workspace's place.
