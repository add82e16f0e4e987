//! samtrain's API: the job spec users submit ([`spec`]) and the gRPC
//! services between the command line, the coordinator and the workers.

pub mod spec;
